"""What the Triton launchers (densenet_fast/ops/triton/) do beyond the op suite's checks of the
triton backend against densenet_fast.ops.reference (tests/test_<op>.py):

* Their own conventions: empty statistics and weight gradients where none were asked for; a copy
  target of another shape refused; the statistics finalize over many tiles.
* NaN and Inf: the prologue's ReLU propagates NaN as torch.relu does (an fp16 overflow upstream
  must not vanish), and the backward passes the gradient where the ReLU's output is NaN, as
  torch.relu's backward (threshold_backward) does. Each op is checked against the reference (plain
  PyTorch, float64, rounded to the op's dtype like the kernel's outputs), and the reference against
  torch autograd through relu(x * scale + shift) itself. (In the CPU interpreter ``tl.maximum`` is
  numpy's, which keeps NaN; on a GPU it is ``max.f32``, which drops it: there these cases are what
  catch it.)
* Devices: every launch runs on the device of the op's tensors, not the current device.

``TRITON_INTERPRET`` is set in conftest.py, before triton loads, where no GPU runs the kernels.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from densenet_fast.ops import reference
from densenet_fast.ops.triton import (
    bn_relu_conv1x1,
    bn_relu_conv1x1_backward,
    bn_relu_conv3x3,
    bn_relu_conv3x3_backward,
    bn_relu_pool_conv1x1,
    bn_relu_pool_conv1x1_backward,
    channel_stats,
    common,
)
from helpers import TRITON_DEVICE as DEVICE, dtype_params

# (dtype, atol, rtol) of the fused ops; bf16 tl.dot is wrong in Triton 3.8's CPU interpreter, so bf16 runs on CUDA only.
DTYPES = dtype_params("op", torch.float32, torch.float16, torch.bfloat16, cuda_only=(torch.bfloat16,))


def bn_affine(c):
    """A layer's BN-ReLU as (scale, shift) on DEVICE: about a fifth of the scales negative (as a
    BN weight can be), the rest in [0.5, 1.5], and shifts that make the ReLU cut some values."""
    sign = torch.where(torch.rand(c) < 0.2, -1.0, 1.0)
    return (sign * torch.empty(c).uniform_(0.5, 1.5)).to(DEVICE), (0.5 * torch.randn(c)).to(DEVICE)


def _float64(*tensors):
    return [None if t is None else t.double() for t in tensors]


def _rounded_like(actual, want):
    """The float64 reference rounded to the dtype of the launcher's output, as the kernel rounds."""
    return want.to(actual.dtype)


# ---- the launchers' own conventions ----------------------------------------------------------------


def test_without_stats_and_without_weight_grad_they_return_empty_tensors():
    torch.manual_seed(1)
    x = torch.randn(2, 24, 5, 5, device=DEVICE)[:, 3:20]  # a slice starting at an odd channel
    scale, shift = bn_affine(17)
    weight = torch.randn(9, 17, 1, 1, device=DEVICE) / 17 ** 0.5
    z, mean, var = bn_relu_conv1x1(x, scale, shift, weight, False)
    assert mean.numel() == 0 and var.numel() == 0
    want = reference.bn_relu_conv1x1(*_float64(x, scale, shift, weight), False)[0]
    torch.testing.assert_close(z, _rounded_like(z, want), atol=1e-4, rtol=1e-4)
    w3 = torch.randn(6, 17, 3, 3, device=DEVICE) / 17
    out = torch.empty(2, 6, 5, 5, device=DEVICE)
    mean, var = bn_relu_conv3x3(x, scale, shift, w3, out, None, False)
    assert mean.numel() == 0 and var.numel() == 0
    out64 = torch.empty(out.shape, dtype=torch.float64, device=DEVICE)
    reference.bn_relu_conv3x3(*_float64(x, scale, shift, w3), out64, None, False)
    torch.testing.assert_close(out, _rounded_like(out, out64), atol=1e-4, rtol=1e-4)
    center = (0.1 * torch.randn(17)).to(DEVICE)
    for op, ref, w in ((bn_relu_conv1x1_backward, reference.bn_relu_conv1x1_backward, weight),
                       (bn_relu_conv3x3_backward, reference.bn_relu_conv3x3_backward, w3)):
        grad_out = torch.randn(2, w.shape[0], 5, 5, device=DEVICE)
        grad_x = torch.full_like(x, float("nan"))
        gw, s, sxc = op(grad_out, x, scale, shift, w, center, grad_x, False, False)
        assert gw.numel() == 0
        grad_x64 = torch.empty(x.shape, dtype=torch.float64, device=DEVICE)
        want = ref(*_float64(grad_out, x, scale, shift, w, center), grad_x64, False, False)
        torch.testing.assert_close(grad_x, _rounded_like(grad_x, grad_x64), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(s, _rounded_like(s, want.sum_dy), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sxc, _rounded_like(sxc, want.sum_dy_xc), atol=1e-4, rtol=1e-4)


def test_copy_target_of_another_shape_is_refused():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 4, 5, device=DEVICE)
    with pytest.raises(ValueError, match=r"copies x into an out of its shape \(2, 3, 4, 5\)"):
        channel_stats(x, out=torch.empty(2, 4, 4, 5, device=DEVICE))


def test_finalize_over_many_tiles():
    """finalize_stats (one program per channel here) over 1172 tiles, more than one step of 1024,
    the last tile partial: from partials computed by torch, against torch's statistics."""
    from densenet_fast.ops.triton.partials import finalize_stats

    torch.manual_seed(2)
    m, c, tile = 300_000, 3, 256
    values = (torch.randn(m, c, dtype=torch.float64) * 3 + 5)
    tiles = [values[i:i + tile] for i in range(0, m, tile)]
    means = torch.stack([t.mean(0) for t in tiles], 1)
    m2 = torch.stack([((t - t.mean(0)) ** 2).sum(0) for t in tiles], 1)
    mean, var = finalize_stats(torch.stack([means, m2]).float().to(DEVICE), m, tile)
    torch.testing.assert_close(mean, values.mean(0).float().to(DEVICE), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var, values.var(0, unbiased=False).float().to(DEVICE), atol=1e-5, rtol=1e-5)


# ---- NaN and Inf -------------------------------------------------------------------------------------

N, C_IN, C_OUT, H, W = 2, 20, 12, 6, 7


def _conv3x3(x, scale, shift, weight):
    out = torch.empty(N, C_OUT, H, W, dtype=x.dtype, device=x.device)
    return (out, *bn_relu_conv3x3(x, scale, shift, weight, out, None, True))


def _conv3x3_ref(x, scale, shift, weight):
    out = torch.empty(N, C_OUT, H, W, dtype=x.dtype, device=x.device)
    return (out, *reference.bn_relu_conv3x3(x, scale, shift, weight, out, None, True))


FORWARD = {
    "conv1x1": (1, lambda x, s, b, w: bn_relu_conv1x1(x, s, b, w, True), lambda y, w: F.conv2d(y, w)),
    "conv3x3": (3, _conv3x3, lambda y, w: F.conv2d(y, w, padding=1)),
    "pool": (1, lambda x, s, b, w: (bn_relu_pool_conv1x1(x, s, b, w),), lambda y, w: F.conv2d(F.avg_pool2d(y, 2), w)),
}
REFERENCE = {
    "conv1x1": lambda x, s, b, w: reference.bn_relu_conv1x1(x, s, b, w, True),
    "conv3x3": _conv3x3_ref,
    "pool": lambda x, s, b, w: (reference.bn_relu_pool_conv1x1(x, s, b, w),),
}
BACKWARD = {
    "conv1x1": (bn_relu_conv1x1_backward, reference.bn_relu_conv1x1_backward),
    "conv3x3": (bn_relu_conv3x3_backward, reference.bn_relu_conv3x3_backward),
    "pool": (bn_relu_pool_conv1x1_backward, reference.bn_relu_pool_conv1x1_backward),
}


def _poisoned(dtype):
    """Seeded activations with NaN, +Inf and -Inf at a few places (in different images)."""
    x = torch.randn(N, C_IN, H, W)
    x[0, 3, 2, 4] = float("nan")
    x[1, 7, 0, 0] = float("inf")
    x[1, 11, 5, 5] = float("-inf")
    x[0, 15, 4, 1] = float("inf")
    return x.to(dtype).to(DEVICE)


def _inputs(kind, dtype, seed):
    torch.manual_seed(seed)
    k = FORWARD[kind][0]
    x = _poisoned(dtype)
    scale, shift = bn_affine(C_IN)
    weight = (torch.randn(C_OUT, C_IN, k, k) / (k * k * C_IN) ** 0.5).to(dtype).to(DEVICE)
    return x, scale, shift, weight


def _pre(x, scale, shift):
    return x.double() * scale.double()[:, None, None] + shift.double()[:, None, None]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("kind", list(FORWARD))
def test_forward_propagates_nan_and_inf_like_torch(kind, dtype, atol, rtol):
    x, scale, shift, weight = _inputs(kind, dtype, seed=10)
    outputs = FORWARD[kind][1](x, scale, shift, weight)
    expected = [_rounded_like(actual, want)
                for actual, want in zip(outputs, REFERENCE[kind](*_float64(x, scale, shift, weight)))]
    by_torch = FORWARD[kind][2](torch.relu(_pre(x, scale, shift)), weight.double()).to(dtype)
    torch.testing.assert_close(expected[0], by_torch, atol=atol, rtol=rtol, equal_nan=True)
    assert outputs[0].isnan().any() and not outputs[0].isnan().all()
    for actual, want in zip(outputs, expected):  # the output, and its statistics where computed
        torch.testing.assert_close(actual, want, atol=atol, rtol=rtol, equal_nan=True)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("kind", list(BACKWARD))
def test_backward_passes_the_gradient_where_relu_gives_nan(kind, dtype, atol, rtol):
    x, scale, shift, weight = _inputs(kind, dtype, seed=11)
    out_hw = (H // 2, W // 2) if kind == "pool" else (H, W)
    grad_out = (torch.randn(N, C_OUT, *out_hw) / (N * H * W) ** 0.5).to(dtype).to(DEVICE)
    center = (0.1 * torch.randn(C_IN)).to(DEVICE)
    op, ref = BACKWARD[kind]
    grad_x = torch.zeros_like(x)
    grad_w, sum_dy, sum_dy_xc = op(grad_out, x, scale, shift, weight, center, grad_x, True, True)
    gx64 = torch.zeros(x.shape, dtype=torch.float64, device=DEVICE)
    want = ref(*_float64(grad_out, x, scale, shift, weight, center), gx64, True, True)
    gx_ref = gx64.to(dtype)
    # torch autograd through relu(x * scale + shift) itself
    pre = _pre(x, scale, shift).requires_grad_(True)
    FORWARD[kind][2](torch.relu(pre), weight.double()).backward(grad_out.double())
    by_torch = (pre.grad * scale.double()[:, None, None]).to(dtype)
    torch.testing.assert_close(gx_ref, by_torch, atol=atol, rtol=rtol, equal_nan=True)
    assert grad_x[0, 3, 2, 4] != 0  # where the ReLU's output is NaN its gradient passes
    # The weight gradient comes in the statistics dtype (float32); the reference's is rounded to the weight's.
    assert grad_w.dtype == torch.float32 and grad_w.is_contiguous()
    grad_w = grad_w.to(dtype)
    for actual, expected in ((grad_x, gx_ref), (grad_w, want.grad_weight.to(dtype)),
                             (sum_dy, want.sum_dy.float()), (sum_dy_xc, want.sum_dy_xc.float())):
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True)


# ---- devices -----------------------------------------------------------------------------------------


def test_every_launch_is_guarded_with_the_tensors_device(monkeypatch):
    """Each Triton launch enters the guard with the device of the op's tensors (on a GPU,
    torch.cuda.device(that device); see the two-GPU test below)."""
    entered = []

    def recording_guard(device):
        entered.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(common, "device_guard", recording_guard)
    x, scale, shift, weight = _inputs("conv1x1", torch.float32, seed=12)
    x = torch.nan_to_num(x)
    bn_relu_conv1x1(x, scale, shift, weight, True)
    assert entered == [x.device] * 2  # the GEMM and its statistics finalize
    entered.clear()
    grad_out = torch.randn(N, C_OUT, H, W, device=DEVICE)
    bn_relu_conv1x1_backward(grad_out, x, scale, shift, weight, torch.zeros_like(scale), torch.empty_like(x),
                             False, True)
    assert entered == [x.device] * 2  # the data and weight GEMMs (one launch), the kernel finishing their sums


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_on_the_second_gpu_while_the_first_is_current():
    torch.manual_seed(13)
    dev = torch.device("cuda:1")
    x = torch.randn(N, C_IN, H, W, device=dev)
    scale, shift = (t.to(dev) for t in bn_affine(C_IN))
    weight = torch.randn(C_OUT, C_IN, 1, 1, device=dev) / C_IN ** 0.5
    grad_out = torch.randn(N, C_OUT, H, W, device=dev) / (N * H * W) ** 0.5
    center = torch.zeros(C_IN, device=dev)
    with torch.cuda.device(0):
        z, mean, var = bn_relu_conv1x1(x, scale, shift, weight, True)
        grad_x = torch.empty_like(x)
        grad_w, sum_dy, sum_dy_xc = bn_relu_conv1x1_backward(grad_out, x, scale, shift, weight, center, grad_x,
                                                             False, True)
        torch.cuda.synchronize(dev)
        assert torch.cuda.current_device() == 0
    for actual, want in zip((z, mean, var), reference.bn_relu_conv1x1(*_float64(x, scale, shift, weight), True)):
        assert actual.device == dev
        torch.testing.assert_close(actual, _rounded_like(actual, want), atol=1e-4, rtol=1e-4)
    gx64 = torch.empty(x.shape, dtype=torch.float64, device=dev)
    want = reference.bn_relu_conv1x1_backward(*_float64(grad_out, x, scale, shift, weight, center), gx64, False, True)
    for actual, expected in ((grad_x, gx64), (grad_w, want.grad_weight), (sum_dy, want.sum_dy),
                             (sum_dy_xc, want.sum_dy_xc)):
        torch.testing.assert_close(actual, _rounded_like(actual, expected), atol=1e-4, rtol=1e-4)
