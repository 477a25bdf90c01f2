"""Mixed precision, channels_last and numerics, against float64 references and torchvision."""
import pytest
import torch
import torchvision

import densenet_fast
from densenet_fast.models import _DenseBlock, _Transition
from helpers import autocast_errors

CONFIG = dict(growth_rate=8, block_config=(2, 3), num_init_features=16, num_classes=5)


def _pair(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    fast = densenet_fast.DenseNet(**CONFIG).to(dtype)
    tv = torchvision.models.DenseNet(**CONFIG).to(dtype)
    tv.load_state_dict(fast.state_dict())
    ref = torchvision.models.DenseNet(**CONFIG).double()
    ref.load_state_dict(fast.state_dict())
    return fast, tv, ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_error_is_a_small_multiple_of_torchvisions(dtype):
    fast, tv, ref = _pair()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out, fast_out_err, fast_grad_err = autocast_errors(fast, ref, x, dtype)
    ref.zero_grad()
    out_tv, tv_out_err, tv_grad_err = autocast_errors(tv, ref, x, dtype)
    assert out.dtype == out_tv.dtype == dtype
    assert fast_out_err <= 3 * tv_out_err
    assert fast_grad_err <= 3 * tv_grad_err
    for p in fast.parameters():
        assert p.grad.dtype == torch.float32  # parameters and their grads stay fp32 under autocast


def test_autocast_with_grad_scaler_steps():
    fast, _, _ = _pair()
    opt = torch.optim.SGD(fast.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 1, 2, 3])
    before = fast.classifier.weight.detach().clone()
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(fast(x), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert torch.isfinite(fast.classifier.weight).all() and not torch.equal(before, fast.classifier.weight)


def test_channels_last_gives_channels_last_and_same_numbers():
    fast, _, _ = _pair(torch.float64)
    x = torch.randn(2, 3, 33, 31, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    x = x.requires_grad_(True)
    features = fast.features(x)
    features_cl = fast.features(x_cl)
    assert features_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(features_cl, features)
    g = torch.randn(features.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    params = list(fast.features.parameters())
    grads = torch.autograd.grad(features, [x] + params, g)
    grads_cl = torch.autograd.grad(features_cl, [x_cl] + params, g)
    for a, b in zip(grads_cl, grads):
        torch.testing.assert_close(a, b)


def _block_pair(dtype):
    torch.manual_seed(0)
    ours = torch.nn.ModuleDict({"block": _DenseBlock(3, 6, 2, 4, 0.0), "transition": _Transition(18, 9)}).to(dtype)
    tv = torch.nn.ModuleDict({"block": torchvision.models.densenet._DenseBlock(3, 6, 2, 4, 0.0),
                              "transition": torchvision.models.densenet._Transition(18, 9)})
    tv.load_state_dict(ours.state_dict())
    return ours, tv.to(dtype)


def _run_block(pair, x):
    x = x.clone().requires_grad_(True)
    out = pair["transition"](pair["block"](x))
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(out.dtype)
    (gx,) = torch.autograd.grad(out, x, g)
    return out.double(), gx.double()


def test_statistics_stay_accurate_with_a_large_mean():
    # Block input far from zero relative to its spread: BN statistics must not cancel.
    x = 1e4 + torch.randn(4, 6, 9, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    ref_out, ref_gx = _run_block(_block_pair(torch.float64)[1], x)
    ours, tv = _block_pair(torch.float32)
    out, gx = _run_block(ours, x.float())
    out_tv, gx_tv = _run_block(tv, x.float())
    out_err, gx_err = (out - ref_out).abs().max(), (gx - ref_gx).abs().max()
    assert out_err <= 4 * (out_tv - ref_out).abs().max() + 1e-3
    assert gx_err <= 4 * (gx_tv - ref_gx).abs().max() + 1e-6


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_propagate_like_torchvision(bad):
    fast, tv, _ = _pair()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    x[1, 0, 5, 5] = bad
    out, out_tv = fast(x), tv(x)
    assert torch.equal(torch.isnan(out), torch.isnan(out_tv))
    assert torch.equal(torch.isinf(out), torch.isinf(out_tv))
    out.sum().backward()  # no crash in backward either
