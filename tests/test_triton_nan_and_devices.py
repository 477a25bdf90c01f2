"""Two behaviours every fused Triton op shares.

* NaN and Inf: the prologue's ReLU propagates NaN as torch.relu does (an fp16 overflow upstream
  must not vanish), and the backward passes the gradient where the ReLU's output is NaN, as
  torch.relu's backward (threshold_backward) does. Each op is checked against its ``*_ref`` and the
  reference against plain torch autograd. (In the CPU interpreter ``tl.maximum`` is numpy's, which
  keeps NaN; on a GPU it is ``max.f32``, which drops it: there these cases are what catch it.)
* Devices: every launch runs on the device of the op's tensors, not the current device.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from densenet_fast.ops.triton import (
    bn_relu_conv1x1,
    bn_relu_conv1x1_backward,
    bn_relu_conv1x1_backward_ref,
    bn_relu_conv1x1_ref,
    bn_relu_conv3x3,
    bn_relu_conv3x3_backward,
    bn_relu_conv3x3_backward_ref,
    bn_relu_conv3x3_ref,
    bn_relu_pool_conv1x1,
    bn_relu_pool_conv1x1_backward,
    bn_relu_pool_conv1x1_backward_ref,
    bn_relu_pool_conv1x1_ref,
    common,
)
from triton_cases import DEVICE, DTYPES, bn_affine

N, C_IN, C_OUT, H, W = 2, 20, 12, 6, 7
FORWARD = {
    "conv1x1": (1, lambda x, s, b, w: bn_relu_conv1x1(x, s, b, w, True), lambda y, w: F.conv2d(y, w)),
    "conv3x3": (3, lambda x, s, b, w: _conv3x3(x, s, b, w), lambda y, w: F.conv2d(y, w, padding=1)),
    "pool": (1, lambda x, s, b, w: (bn_relu_pool_conv1x1(x, s, b, w),), lambda y, w: F.conv2d(F.avg_pool2d(y, 2), w)),
}
REFERENCE = {
    "conv1x1": lambda x, s, b, w: bn_relu_conv1x1_ref(x, s, b, w, True),
    "conv3x3": lambda x, s, b, w: bn_relu_conv3x3_ref(x, s, b, w, None, True),
    "pool": lambda x, s, b, w: (bn_relu_pool_conv1x1_ref(x, s, b, w),),
}
BACKWARD = {
    "conv1x1": (bn_relu_conv1x1_backward, bn_relu_conv1x1_backward_ref),
    "conv3x3": (bn_relu_conv3x3_backward, bn_relu_conv3x3_backward_ref),
    "pool": (bn_relu_pool_conv1x1_backward, bn_relu_pool_conv1x1_backward_ref),
}


def _conv3x3(x, scale, shift, weight):
    out = torch.empty(N, C_OUT, H, W, dtype=x.dtype, device=x.device)
    return (out, *bn_relu_conv3x3(x, scale, shift, weight, out, None, True))


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
    expected = REFERENCE[kind](x, scale, shift, weight)
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
    gx_ref, gw_ref, s_ref, sxc_ref = ref(grad_out, x, scale, shift, weight, center, None, True)
    # torch autograd through relu(x * scale + shift) itself
    pre = _pre(x, scale, shift).requires_grad_(True)
    FORWARD[kind][2](torch.relu(pre), weight.double()).backward(grad_out.double())
    by_torch = (pre.grad * scale.double()[:, None, None]).to(dtype)
    torch.testing.assert_close(gx_ref, by_torch, atol=atol, rtol=rtol, equal_nan=True)
    assert grad_x[0, 3, 2, 4] != 0  # where the ReLU's output is NaN its gradient passes
    # The weight gradient comes in the statistics dtype (float32); the reference rounds it to the weight's.
    assert grad_w.dtype == torch.float32 and grad_w.is_contiguous()
    grad_w = grad_w.to(gw_ref.dtype)
    for actual, want in ((grad_x, gx_ref), (grad_w, gw_ref), (sum_dy, s_ref), (sum_dy_xc, sxc_ref)):
        torch.testing.assert_close(actual, want, atol=atol, rtol=rtol, equal_nan=True)


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
    for actual, want in zip((z, mean, var), bn_relu_conv1x1_ref(x, scale, shift, weight, True)):
        assert actual.device == dev
        torch.testing.assert_close(actual, want, atol=1e-4, rtol=1e-4)
    gx_ref, gw_ref, s_ref, sxc_ref = bn_relu_conv1x1_backward_ref(grad_out, x, scale, shift, weight, center, None,
                                                                  True)
    for actual, want in ((grad_x, gx_ref), (grad_w, gw_ref), (sum_dy, s_ref), (sum_dy_xc, sxc_ref)):
        torch.testing.assert_close(actual, want, atol=1e-4, rtol=1e-4)
