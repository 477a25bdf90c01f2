"""Issue 10, the drop-in contract: where torchvision's DenseNet works, ours works with torchvision's numbers (float64,
same weights: outputs, input grads, every parameter grad, running stats), and the standard model keeps the fused op.
Module edits, autodiff and export have their own files (test_drop_in_modules/_autodiff/_export.py)."""
import re

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops.misc import FrozenBatchNorm2d

import densenet_fast
from drop_in_helpers import (
    CONFIG,
    CONFIG3,
    assert_fused,
    assert_same_tensors,
    seeded,
    tiny_input,
    torchvision_twin,
    train_step,
)
from helpers import compare_with_reference, randomize_bn

BUILDERS = ["densenet121", "densenet161", "densenet169", "densenet201"]
# The builders' FLOP counts: densenet121 and densenet161 took over 5 s each in a full run.
FLOPS_BUILDERS = [pytest.param(name, marks=pytest.mark.slow) if name in ("densenet121", "densenet161") else name
                  for name in BUILDERS]



# --- the standard model keeps the fused op ---------------------------------------------------------------


@pytest.mark.parametrize("config", [CONFIG, CONFIG3], ids=["2_blocks", "3_blocks"])
def test_standard_model_matches_and_stays_fused(config):
    tv, ours = torchvision_twin(config=config)
    x = tiny_input(config)
    compare_with_reference(ours, tv, x)
    stages = len(config["block_config"])  # a block and the transition after it are one stage
    ours.train()
    assert_fused(lambda: train_step(ours, x), stages)
    ours.eval()
    with torch.no_grad():
        assert_fused(lambda: ours(x), stages)


@pytest.mark.slow
def test_torch_compile_keeps_the_fused_op():
    """~5 s: compiles (aot_eager: dynamo and AOTAutograd trace it as torch.compile's backends do, without
    Inductor's C++ compile time)."""
    tv, ours = torchvision_twin()
    ours.compile(backend="aot_eager", fullgraph=True)  # in place: parameter names stay torchvision's
    x = tiny_input()
    compare_with_reference(ours, tv, x)
    ours.train()
    assert_fused(lambda: train_step(ours, x), stages=2)


# --- builders --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILDERS)
def test_get_model_weights_finds_torchvision_enum(name):
    expected = torchvision.models.get_model_weights(getattr(torchvision.models, name))
    assert torchvision.models.get_model_weights(getattr(densenet_fast, name)) is expected


@pytest.mark.filterwarnings("ignore:.*pretrained.*deprecated")
@pytest.mark.filterwarnings("ignore:Arguments other than a weight enum")
def test_legacy_pretrained_false():
    torch.manual_seed(0)
    tv = torchvision.models.densenet121(pretrained=False)
    torch.manual_seed(0)
    ours = densenet_fast.densenet121(pretrained=False)
    assert isinstance(ours, densenet_fast.DenseNet)
    for (key, a), b in zip(ours.state_dict().items(), tv.state_dict().values()):
        assert a.shape == b.shape and torch.equal(a, b), key  # same init, same RNG draws
    assert list(ours.state_dict()) == list(tv.state_dict())


# --- convert() -------------------------------------------------------------------------------------------


def test_convert_keeps_float64_exactly():
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.DenseNet(**CONFIG)).double()
    with torch.no_grad():
        for t in list(tv.parameters()) + [b for b in tv.buffers() if b.is_floating_point()]:
            t.add_(seeded(t.shape, t.numel()) * 1e-12)  # bits float32 cannot hold
    ours = densenet_fast.convert(tv)
    for (key, a), b in zip(ours.state_dict().items(), tv.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), key
    compare_with_reference(ours, tv, tiny_input())


def _append_conv(tv):
    channels = tv.features.norm5.num_features
    tv.features.add_module("extra", nn.Conv2d(channels, channels, 1))


def _circular_conv(tv):
    conv = tv.features.denseblock1.denselayer1.conv2
    tv.features.denseblock1.denselayer1.conv2 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1,
                                                          bias=False, padding_mode="circular")


def _silu(tv):
    tv.features.denseblock2.denselayer1.relu1 = nn.SiLU()


def _frozen_bn(tv):
    norm = tv.features.denseblock1.denselayer2.norm1
    frozen = FrozenBatchNorm2d(norm.num_features)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(frozen, name).copy_(getattr(norm, name).detach())
    tv.features.denseblock1.denselayer2.norm1 = frozen


def _stem_sequential(tv):
    tv.features.conv0 = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 8, 3, 1, 1, bias=False))


def _classifier_dropout(tv):
    tv.classifier = nn.Sequential(nn.Dropout(0.0), tv.classifier)


CONVERT_EDITS = {  # what convert() must carry, or refuse with one error naming it
    "appended_module": (_append_conv, r"extra"),
    "circular_padding": (_circular_conv, r"circular|padding_mode"),
    "silu_in_block": (_silu, r"SiLU"),
    "frozen_bn_in_block": (_frozen_bn, r"FrozenBatchNorm2d"),
    "sequential_stem": (_stem_sequential, r"conv0|Sequential"),
    "sequential_classifier": (_classifier_dropout, r"classifier|Sequential"),
}


@pytest.mark.parametrize("case", list(CONVERT_EDITS))
def test_convert_carries_every_module_or_refuses(case):
    edit, named = CONVERT_EDITS[case]
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.DenseNet(**CONFIG))
    edit(tv)
    tv = tv.double()
    try:
        ours = densenet_fast.convert(tv, memory_efficient=False)  # the source's: a fallback then runs as it does
    except (TypeError, ValueError) as err:
        assert "convert" in str(err) and re.search(named, str(err)), f"convert refused without naming what: {err}"
        return
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in tv.named_modules()], "a module was dropped"
    compare_with_reference(ours, tv, tiny_input())


def test_convert_keeps_sync_batchnorm():
    torch.manual_seed(0)
    tv = nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.DenseNet(**CONFIG)).double()
    ours = densenet_fast.convert(tv)
    kinds = {n: type(m) for n, m in tv.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert {n: type(m) for n, m in ours.named_modules() if n in kinds} == kinds
    compare_with_reference(ours, tv, tiny_input())


# --- BatchNorm settings, batches, devices ------------------------------------------------------------------


def _bn_settings(momentum_none: bool, untracked: bool):
    def modify(model):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if momentum_none:
                    m.momentum = None
                if untracked:
                    m.num_batches_tracked = None
    return modify


@pytest.mark.parametrize("momentum_none, untracked", [(True, False), (False, True), (True, True)],
                         ids=["momentum_none", "num_batches_tracked_none", "both"])
def test_bn_momentum_none_and_num_batches_tracked_none(momentum_none, untracked):
    tv, ours = torchvision_twin(_bn_settings(momentum_none, untracked))
    compare_with_reference(ours, tv, tiny_input(), steps=3)


def test_empty_batch_in_training():
    tv, ours = torchvision_twin()
    x = tiny_input(batch=0)
    compare_with_reference(ours, tv, x)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_meta_device_forward(mode):
    with torch.device("meta"):
        tv = torchvision.models.DenseNet(**CONFIG).train(mode == "train")
        ours = densenet_fast.DenseNet(**CONFIG).train(mode == "train")
        x = torch.empty(3, 3, 16, 12)
    out_tv, out = tv(x), ours(x)
    assert out.is_meta and out.shape == out_tv.shape and out.dtype == out_tv.dtype


def test_in_place_op_on_a_block_output_before_backward():
    tv, ours = torchvision_twin()
    x = seeded((3, 8, 4, 3), 2)

    def step(model):
        xs = x.clone().requires_grad_(True)
        features = model.features.denseblock1(xs)
        features.mul_(1.5)  # in place, as a user's head might do
        pooled = model.features.transition1(features)
        pooled.add_(0.25)
        out = model.features.denseblock2(pooled)
        out.relu_()
        out.pow(2).sum().backward()
        return [out.detach(), xs.grad] + [p.grad for p in model.parameters() if p.grad is not None]

    assert_same_tensors(step(ours), step(tv), "output, input grad, parameter grads")


# --- edited stems: the size check follows the actual stem ---------------------------------------------------


def _cifar_stem(model):
    model.features.conv0 = nn.Conv2d(3, 8, kernel_size=3, stride=1, padding=1, bias=False)
    model.features.pool0 = nn.Identity()


@pytest.mark.parametrize("edit", [_cifar_stem, _stem_sequential], ids=["conv3x3_stride1_no_pool", "sequential"])
def test_edited_stem(edit):
    tv, ours = torchvision_twin(edit)
    # 4x4: too small for the default stem (/4, leaving 1x1 for a 2x2 transition), enough for a stride-1 stem.
    x = seeded((3, 3, 4, 4) if edit is _cifar_stem else (3, 3, 12, 12), 3)
    compare_with_reference(ours, tv, x)


# --- dtypes --------------------------------------------------------------------------------------------------


def test_float64_model_under_cpu_bf16_autocast():
    """CPU autocast casts no float64 tensor: torchvision computes in float64, so must we."""
    tv, ours = torchvision_twin()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compare_with_reference(ours, tv, tiny_input())


def _max_errors(model, x, refs):
    """Max abs error of (output, input grad, every parameter grad) of one training step against ``refs``."""
    xs = x.clone().requires_grad_(True)
    out = model(xs)
    out.float().backward(seeded(out.shape, 8, torch.float32))
    values = [out, xs.grad] + [p.grad for p in model.parameters()]
    return [(v.double() - r).abs().max().item() for v, r in zip(values, refs)]


def test_bf16_model_with_float32_batchnorms():
    """A bfloat16 model whose BatchNorms stay float32 (a common mixed-precision recipe), one training step.
    Tolerance the flash-attention way: our error against a float64 twin (same bf16 weights and input) at most
    K x torchvision's own error, plus one bf16 ulp of the largest reference value."""
    K = 2.0

    def bf16_keep_bn(model):
        model.bfloat16()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.float()
        return model

    torch.manual_seed(0)
    tv = bf16_keep_bn(randomize_bn(torchvision.models.DenseNet(**CONFIG)))
    ours = bf16_keep_bn(densenet_fast.DenseNet(**CONFIG))
    ours.load_state_dict(tv.state_dict())
    ref = torchvision.models.DenseNet(**CONFIG).double()
    ref.load_state_dict(tv.state_dict())  # copies upcast: the float64 twin holds the same values
    x = tiny_input().bfloat16()
    xr = x.double().requires_grad_(True)
    out_ref = ref(xr)
    out_ref.backward(seeded(out_ref.shape, 8, torch.float32).double())
    refs = [out_ref.detach(), xr.grad] + [p.grad for p in ref.parameters()]
    errors_tv, errors = _max_errors(tv, x, refs), _max_errors(ours, x, refs)
    names = ["output", "input grad"] + [n for n, _ in ref.named_parameters()]
    for name, err, err_tv, r in zip(names, errors, errors_tv, refs):
        ulp = 2.0 ** -8 * r.abs().max().item()
        assert err <= K * err_tv + ulp, f"{name}: error {err:.3g}, torchvision's {err_tv:.3g} (ulp {ulp:.3g})"


# --- FLOPs ---------------------------------------------------------------------------------------------------


def _flops(model, x, backward=False):
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("backward", [False, True], ids=["eval_forward", "train_forward_backward"])
def test_flop_counter_counts_what_torchvision_counts(backward):
    """Model FLOPs as torchvision counts them: transitions conv then pool, no recomputation in backward."""
    tv, ours = torchvision_twin(config=CONFIG3)
    tv.train(backward)
    ours.train(backward)
    x = tiny_input(CONFIG3)
    assert _flops(ours, x, backward) == _flops(tv, x, backward)


@pytest.mark.parametrize("name", FLOPS_BUILDERS)
def test_flops_match_torchvision_weights_metadata(name):
    """torchvision's test_schema_meta_validation FLOP check, offline: counted at 1x3x224x224 in eval mode,
    multiply-adds in GFLOPs (FlopCounterMode counts 2 per multiply-add), rounded to 3 decimals. ~2 s each."""
    weights = torchvision.models.get_model_weights(getattr(torchvision.models, name)).DEFAULT
    model = getattr(densenet_fast, name)().eval()
    with torch.no_grad():
        flops = _flops(model, torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    assert round(flops / 2 / 1e9, 3) == weights.meta["_ops"]
