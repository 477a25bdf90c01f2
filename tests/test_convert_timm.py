"""convert() on timm's DenseNets: the same numbers as timm's own model."""
import pytest
import torch
from torch import nn

import densenet_fast
from helpers import compare_with_reference, randomize_bn

timm = pytest.importorskip("timm")  # a declared test dependency (Makefile); guards a bare install


@pytest.mark.parametrize("proj_drop_rate", [0.0, 0.2])
def test_timm_densenet_converts_to_the_same_network(proj_drop_rate):
    torch.manual_seed(0)
    theirs = timm.models.densenet.DenseNet(growth_rate=8, block_config=(2, 3, 2), num_classes=7, bn_size=2,
                                           proj_drop_rate=proj_drop_rate).double()
    theirs.features.denseblock2.denselayer1.norm1.eval()
    fast = densenet_fast.convert(theirs)
    assert fast.features.denseblock1.denselayer1.drop_rate == proj_drop_rate
    assert not fast.features.denseblock2.denselayer1.norm1.training
    x = torch.randn(2, 3, 64, 48, dtype=torch.double, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    out_theirs = theirs(x)
    torch.manual_seed(3)
    out = fast(x)
    torch.testing.assert_close(out, out_theirs)
    out.sum().backward()
    out_theirs.sum().backward()
    for (name, p), q in zip(fast.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for (name, b), c in zip(fast.named_buffers(), theirs.buffers()):
        torch.testing.assert_close(b, c, msg=name)


def _timm(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = timm.models.densenet.DenseNet(growth_rate=4, block_config=(2, 2), num_classes=5, bn_size=2, **kwargs)
    randomize_bn(model)
    return model.double()


def _x():
    return torch.randn(2, 3, 32, 32, dtype=torch.double, generator=torch.Generator().manual_seed(1))


def _frozen(model):
    # timm's FrozenBatchNormAct2d in one norm slot: BN, then its ReLU, inside one module.
    layer = model.features.denseblock2.denselayer1
    layer.norm2 = timm.layers.freeze_batch_norm_2d(layer.norm2)
    return model


def _plain_bn(model):
    # A plain BatchNorm2d in a timm norm slot: timm then applies no activation there.
    model.features.transition1.norm = randomize_bn(nn.BatchNorm2d(16)).double()
    return model


# name -> (model, path of a module that must be carried with its type)
CARRIED = {
    "deep_stem": (lambda: _timm(stem_type="deep"), "features.conv1"),
    "deep_tiered_stem": (lambda: _timm(stem_type="deep_tiered"), "features.conv2"),
    "blur_pool_stem": (lambda: _timm(aa_layer=timm.layers.BlurPool2d), "features.pool0"),
    "blur_pool_transitions": (lambda: _timm(aa_layer=timm.layers.BlurPool2d, aa_stem_only=False),
                              "features.transition1.pool"),
    "frozen_norm_act_in_a_layer": (lambda: _frozen(_timm()), "features.denseblock2.denselayer1.norm2"),
    "plain_batchnorm_in_a_norm_slot": (lambda: _plain_bn(_timm()), "features.transition1.norm"),
}


@pytest.mark.parametrize("memory_efficient", [True, False], ids=["memory_efficient", "not_memory_efficient"])
@pytest.mark.parametrize("case", sorted(CARRIED))
def test_timm_variants_are_carried_module_for_module(case, memory_efficient):
    make, path = CARRIED[case]
    theirs = make()  # timm's default: no checkpointing
    fast = densenet_fast.convert(theirs, memory_efficient=memory_efficient)
    assert type(fast.get_submodule(path)) is type(theirs.get_submodule(path))
    compare_with_reference(fast, theirs, _x())


def test_batchnorm_act_becomes_batchnorm_then_its_activation():
    theirs = _timm()
    theirs.features.denseblock1.denselayer2.norm1.act = nn.SiLU()
    fast = densenet_fast.convert(theirs)
    layer = fast.features.denseblock1.denselayer2
    assert type(layer.norm1) is nn.BatchNorm2d and type(layer.relu1) is nn.SiLU
    assert type(fast.features.norm0) is nn.BatchNorm2d and type(fast.features.relu0) is nn.ReLU
    assert type(fast.features.norm5) is nn.BatchNorm2d and not hasattr(fast, "global_pool")
    compare_with_reference(fast, theirs, _x())


def test_timm_sync_batchnorm_act_becomes_torch_sync_batchnorm():
    theirs = timm.layers.convert_sync_batchnorm(_timm())
    fast = densenet_fast.convert(theirs)
    norms = [(name, m) for name, m in fast.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 1 + 2 * 4 + 1 + 1 and all(type(m) is nn.SyncBatchNorm for _, m in norms)
    compare_with_reference(fast, theirs, _x())


def _appended(model):
    model.features.add_module("extra", nn.Identity())
    return model


@pytest.mark.parametrize("make, path, match", [
    (lambda: _timm(act_layer="gelu"), "features.norm5", "applies Identity/GELU, expected ReLU only"),
    (lambda: _appended(_timm()), "features.extra", "expected ReLU only"),
    (lambda: _timm(global_pool="max"), "global_pool", "global pooling 'max'"),
    (lambda: _timm(global_pool="fast"), "global_pool", "global pooling 'fast'"),
    (lambda: _timm(drop_rate=0.3), "head_drop", "dropout 0.3 before the classifier"),
])
def test_timm_variants_our_head_cannot_compute_are_refused(make, path, match):
    with pytest.raises(TypeError, match=match) as error:
        densenet_fast.convert(make())
    assert str(error.value).startswith("convert expects") and f"{path} (" in str(error.value)
