"""convert(): torchvision's DenseNet, with whatever modules it holds, becomes ours module for module.

Each carried case edits a torchvision model as a user would, converts it, and compares one model
against the other in float64 (outputs, input grads, every parameter grad, running stats, over two
training steps, then eval). Each refusal case checks the one TypeError names the module and its type.
"""
import threading

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import densenet_fast
from helpers import compare_with_reference, randomize_bn


def _tv(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    tv = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5)
    randomize_bn(tv)
    return tv.to(dtype)


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _seeded(module: nn.Module, seed: int = 2) -> nn.Module:
    """``module`` (without buffers) in float64 with seeded random parameters, none zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module.double()


def _frozen_bn(channels: int) -> FrozenBatchNorm2d:
    return randomize_bn(FrozenBatchNorm2d(channels), 3, types=(FrozenBatchNorm2d,)).double()


def _weight_norm(module: nn.Module) -> nn.Module:
    return nn.utils.parametrizations.weight_norm(module)


# name -> (edit of the torchvision model, paths whose module must be carried with its type)
CARRIED = {
    "silu_for_relu1": (lambda tv: setattr(tv.features.denseblock1.denselayer2, "relu1", nn.SiLU()),
                       ["features.denseblock1.denselayer2.relu1"]),
    "frozen_bn_in_a_block": (lambda tv: setattr(tv.features.denseblock2.denselayer1, "norm2", _frozen_bn(16)),
                             ["features.denseblock2.denselayer1.norm2"]),
    "conv1_with_bias": (lambda tv: setattr(tv.features.denseblock1.denselayer1, "conv1",
                                           _seeded(nn.Conv2d(8, 16, 1, bias=True))),
                        ["features.denseblock1.denselayer1.conv1"]),
    "circular_conv2": (lambda tv: setattr(tv.features.denseblock2.denselayer2, "conv2", _seeded(
        nn.Conv2d(16, 4, 3, padding=1, bias=False, padding_mode="circular"))),
        ["features.denseblock2.denselayer2.conv2"]),
    "dilated_conv2": (lambda tv: setattr(tv.features.denseblock1.denselayer1, "conv2", _seeded(
        nn.Conv2d(16, 4, 3, padding=2, dilation=2, bias=False))), ["features.denseblock1.denselayer1.conv2"]),
    "maxpool_transition": (lambda tv: setattr(tv.features.transition1, "pool", nn.MaxPool2d(2, 2)),
                           ["features.transition1.pool"]),
    "module_appended_to_a_transition": (lambda tv: tv.features.transition1.add_module("extra", nn.Hardtanh(-0.5, 0.5)),
                                        ["features.transition1.extra"]),
    "conv_appended_to_features": (lambda tv: tv.features.add_module("extra", _seeded(nn.Conv2d(16, 16, 1))),
                                  ["features.extra"]),
    "dropout_appended_to_features": (lambda tv: tv.features.add_module("extra", nn.Dropout(0.3)),
                                     ["features.extra"]),
    "cifar_stem": (lambda tv: (setattr(tv.features, "conv0", _seeded(nn.Conv2d(3, 8, 3, padding=1, bias=False))),
                               setattr(tv.features, "pool0", nn.Identity())), ["features.conv0", "features.pool0"]),
    "sequential_conv0": (lambda tv: setattr(tv.features, "conv0", _seeded(nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.Conv2d(8, 8, 3, padding=1, bias=False)))),
        ["features.conv0"]),
    "sequential_classifier": (lambda tv: setattr(tv, "classifier", _seeded(nn.Sequential(nn.Dropout(0.2),
                                                                                        nn.Linear(16, 5)))),
                              ["classifier"]),
    "spectral_norm_on_a_block_conv": (lambda tv: nn.utils.spectral_norm(tv.features.denseblock1.denselayer2.conv2),
                                      ["features.denseblock1.denselayer2.conv2"]),
    "weight_norm_parametrization": (lambda tv: _weight_norm(tv.features.denseblock2.denselayer1.conv1),
                                    ["features.denseblock2.denselayer1.conv1"]),
    "bn_momentum_none_and_no_running_stats": (
        lambda tv: (setattr(tv.features.denseblock1.denselayer1.norm1, "momentum", None),
                    setattr(tv.features.transition1, "norm", nn.BatchNorm2d(16, track_running_stats=False).double())),
        ["features.denseblock1.denselayer1.norm1", "features.transition1.norm"]),
    "bn_in_eval_inside_a_training_block": (lambda tv: tv.features.denseblock2.denselayer2.norm1.eval(),
                                           ["features.denseblock2.denselayer2.norm1"]),
    "unused_module_in_a_layer_and_on_the_model": (
        lambda tv: (tv.features.denseblock1.denselayer1.add_module("unused", nn.Linear(2, 2).double()),
                    tv.add_module("aux", nn.Linear(3, 3).double())),
        ["features.denseblock1.denselayer1.unused", "aux"]),
}


# The source runs torchvision's default (no checkpointing: each BN updates its running stats once);
# ours must give its numbers with checkpointing (our default) or without it.
@pytest.mark.parametrize("memory_efficient", [True, False], ids=["memory_efficient", "not_memory_efficient"])
@pytest.mark.parametrize("case", sorted(CARRIED))
def test_carried_module_computes_what_torchvision_computes(case, memory_efficient):
    edit, paths = CARRIED[case]
    tv = _tv()
    edit(tv)
    fast = densenet_fast.convert(tv, memory_efficient=memory_efficient)
    for path in paths:
        mine, theirs = fast.get_submodule(path), tv.get_submodule(path)
        assert type(mine) is type(theirs) and mine is not theirs, path
        assert mine.training == theirs.training, path
    compare_with_reference(fast, tv, _x())


def test_float64_model_is_carried_exactly():
    tv = _tv()
    tv(_x())  # running stats and num_batches_tracked off their initial values
    tv.features.conv0.weight.requires_grad_(False)
    tv.features.denseblock1.denselayer2.norm2.bias.requires_grad_(False)
    tv.features.denseblock2.denselayer1.norm1.eps = 1e-3
    tv.features.transition1.norm.momentum = 0.3
    tv.features.denseblock1.eval()
    before = {k: v.clone() for k, v in tv.state_dict().items()}
    fast = densenet_fast.convert(tv, memory_efficient=False)

    assert isinstance(fast, densenet_fast.DenseNet)
    assert list(fast.state_dict()) == list(tv.state_dict())
    for (key, a), b in zip(fast.state_dict().items(), tv.state_dict().values()):
        assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), key
        assert a.data_ptr() != b.data_ptr(), f"{key} shares storage with the source"
    mine = dict(fast.named_modules())
    for name, theirs in tv.named_modules():
        assert mine[name].training == theirs.training, name
        if isinstance(theirs, nn.BatchNorm2d):
            for attr in ("eps", "momentum", "affine", "track_running_stats", "num_features"):
                assert getattr(mine[name], attr) == getattr(theirs, attr), f"{name}.{attr}"
    for (name, p), q in zip(fast.named_parameters(), tv.parameters()):
        assert p.requires_grad == q.requires_grad and type(p) is nn.Parameter, name
    assert all(layer.memory_efficient is False for block in (fast.features.denseblock1, fast.features.denseblock2)
               for layer in block.values())
    # The source is left as it was.
    for key, value in tv.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_bf16_model_with_float32_batchnorms_keeps_every_dtype():
    tv = _tv(dtype=torch.bfloat16)
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.float()
    fast = densenet_fast.convert(tv)
    dtypes = {key: v.dtype for key, v in tv.state_dict().items()}
    assert {key: v.dtype for key, v in fast.state_dict().items()} == dtypes
    assert dtypes["features.conv0.weight"] == torch.bfloat16
    assert dtypes["features.denseblock1.denselayer1.norm1.running_var"] == torch.float32
    for (key, a), b in zip(fast.state_dict().items(), tv.state_dict().values()):
        assert torch.equal(a, b), key


def test_a_model_on_the_meta_device_stays_there():
    with torch.device("meta"):
        tv = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5)
    fast = densenet_fast.convert(tv)
    assert all(t.is_meta for t in list(fast.parameters()) + list(fast.buffers()))
    assert list(fast.state_dict()) == list(tv.state_dict())


class _UncopyableGroup:
    """Stands for a torch.distributed ProcessGroup, which cannot be deep-copied either."""

    def __deepcopy__(self, memo):
        raise TypeError("cannot pickle 'ProcessGroup' object")


def test_sync_batchnorm_is_kept_with_its_process_group():
    group = _UncopyableGroup()
    tv = nn.SyncBatchNorm.convert_sync_batchnorm(_tv(), process_group=group)
    tv.features.denseblock2.denselayer1.norm1.momentum = None
    fast = densenet_fast.convert(tv)
    mine = dict(fast.named_modules())
    synced = [(name, m) for name, m in tv.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(synced) == 1 + 2 * 4 + 1 + 1  # norm0, two per layer, the transition's, norm5
    for name, theirs in synced:
        assert type(theirs) is nn.SyncBatchNorm and type(mine[name]) is nn.SyncBatchNorm, name
        assert mine[name].process_group is group, name
        for attr in ("eps", "momentum", "affine", "track_running_stats", "num_features", "training"):
            assert getattr(mine[name], attr) == getattr(theirs, attr), f"{name}.{attr}"


def test_sync_batchnorm_model_computes_what_torchvision_computes():
    # Without an initialized process group SyncBatchNorm uses the local batch, on CPU too.
    tv = nn.SyncBatchNorm.convert_sync_batchnorm(_tv())
    fast = densenet_fast.convert(tv)
    assert type(fast.features.denseblock1.denselayer1.norm1) is nn.SyncBatchNorm
    compare_with_reference(fast, tv, _x())


def test_one_module_object_at_two_positions_stays_one():
    tv = _tv()
    shared = nn.SiLU()
    tv.features.denseblock1.denselayer1.relu2 = shared
    tv.features.denseblock2.denselayer2.relu2 = shared
    fast = densenet_fast.convert(tv)
    mine = fast.features.denseblock1.denselayer1.relu2
    assert type(mine) is nn.SiLU and mine is not shared and mine is fast.features.denseblock2.denselayer2.relu2


class _MyLayer(torchvision.models.densenet._DenseLayer):
    pass


class _MyDenseNet(torchvision.models.DenseNet):
    def forward(self, x):
        return self.features(x)


class _MySequential(nn.Sequential):
    pass


class _Locked(nn.Module):
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()

    def forward(self, x):
        return x


def _replace(tv, path, module):
    tv.set_submodule(path, module)


# name -> (edit, path named in the error, type named in the error, what it says)
REFUSED = {
    "missing_transition_relu": (lambda tv: delattr(tv.features.transition1, "relu"),
                                "features.transition1", "_Transition", "has no 'relu'"),
    "missing_layer_norm2": (lambda tv: delattr(tv.features.denseblock1.denselayer1, "norm2"),
                            "features.denseblock1.denselayer1", "_DenseLayer", "has no 'norm2'"),
    "sequential_in_place_of_a_layer": (lambda tv: _replace(tv, "features.denseblock1.denselayer2", nn.Sequential()),
                                       "features.denseblock1.denselayer2", "Sequential", "layers only"),
    "layer_subclass_in_a_block": (
        lambda tv: _replace(tv, "features.denseblock2.denselayer1", _MyLayer(8, 4, 4, 0.0)),
        "features.denseblock2.denselayer1", "_MyLayer", "layers only"),
    "hook_on_a_block": (lambda tv: tv.features.denseblock1.register_forward_hook(lambda m, i, o: o * 2),
                        "features.denseblock1", "_DenseBlock", "has hooks (_forward_hooks)"),
    "features_not_a_plain_sequential": (lambda tv: setattr(tv, "features", _MySequential(*tv.features)),
                                        "features", "_MySequential", "nn.Sequential"),
    "module_that_cannot_be_copied": (lambda tv: tv.features.add_module("extra", _Locked()),
                                     "features.extra", "_Locked", "cannot be deep-copied"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_cannot_be_carried_is_refused_with_one_clear_error(case):
    edit, path, kind, why = REFUSED[case]
    tv = _tv()
    edit(tv)
    with pytest.raises(TypeError) as error:
        densenet_fast.convert(tv)
    message = str(error.value)
    assert message.startswith("convert expects a torchvision or timm DenseNet"), message
    assert f"{path} (" in message and kind in message and why in message, message


def test_models_that_are_not_torchvision_densenets_are_refused():
    with pytest.raises(TypeError, match=r"^convert expects .*the model \(torchvision.models.resnet.ResNet\)"):
        densenet_fast.convert(torchvision.models.resnet18())
    with pytest.raises(TypeError, match=r"_MyDenseNet\): a subclass of torchvision's DenseNet with its own forward"):
        densenet_fast.convert(_MyDenseNet(4, (2, 2), 8, num_classes=5))
    with pytest.raises(TypeError, match=r"densenet_fast.models.DenseNet\): not a torchvision"):
        densenet_fast.convert(densenet_fast.DenseNet(4, (2, 2), 8, num_classes=5))


def _timm_standard():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.models.densenet.DenseNet(growth_rate=4, block_config=(2, 2), num_classes=5, bn_size=2).double()


@pytest.mark.parametrize("make", [_tv, lambda: nn.SyncBatchNorm.convert_sync_batchnorm(_tv()), _timm_standard],
                         ids=["torchvision", "torchvision_sync_batchnorm", "timm"])
def test_a_standard_model_converts_to_one_whose_stages_run_fused(make, monkeypatch):
    # Under the "error" policy a stage that cannot run fused raises instead of falling back.
    monkeypatch.setenv("DENSENET_FAST_FALLBACK", "error")
    source = make()
    fast = densenet_fast.convert(source)
    assert fast.features.denseblock2.stage_name == "features.denseblock2"
    assert fast.features.transition1.stage_name == "features.transition1"
    compare_with_reference(fast, source, _x(), steps=1)
