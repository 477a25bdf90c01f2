"""The compiled ops (csrc/, backend "cpp") against plain PyTorch references.

Each interface method is checked in the fused CPU form and in the device-composite form (what
CUDA runs: the extension's per-channel kernels plus ATen's convolutions), on odd shapes, on
channel slices at odd offsets of bigger NCHW and channels_last buffers, in float64 (tight) and
float32. References are written plainly here: relu(x * scale + shift) -> conv -> autograd.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

if os.environ.get("DENSENET_FAST_BUILD_EXT", "").strip() == "0":
    pytest.skip("installed with DENSENET_FAST_BUILD_EXT=0: no compiled extension", allow_module_level=True)

from densenet_fast.ops import cpp_backend
from densenet_fast.ops.cpp_backend import CppBackend, built_with_cuda
from densenet_fast.ops.interface import StatsOut, write_stats
from helpers import dtype_params

ops = torch.ops.densenet_fast

# (dtype, atol, rtol); references are computed in float64 from the same values.
DTYPES = dtype_params("op", torch.float64, torch.float32)
LAYOUTS = ["nchw", "channels_last"]
# (N, C, H, W): batch 1, odd sizes, channel counts that aren't multiples of 8.
SHAPES = [(1, 13, 7, 5), (3, 37, 9, 11)]
MODES = ["fused", "composite"]


def buffer_slice(shape, dtype, layout, seed, offset=3, device="cpu", shift=0.0):
    """Random values as channels [offset, offset + C) of a bigger buffer (not contiguous)."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(n, c + offset + 2, h, w, generator=g, dtype=torch.float64) + shift
    big = big.to(dtype=dtype, device=device)
    if layout == "channels_last":
        big = big.contiguous(memory_format=torch.channels_last)
    return big[:, offset:offset + c]


def channel_vectors(c, dtype, seed, device="cpu"):
    """scale (both signs), shift and center for C channels, in the statistics dtype."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.randn(c, generator=g, dtype=torch.float64)
    shift = 0.5 * torch.randn(c, generator=g, dtype=torch.float64)
    center = 0.3 * torch.randn(c, generator=g, dtype=torch.float64)
    sdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return [t.to(dtype=sdt, device=device) for t in (scale, shift, center)]


def weight(out_c, in_c, k, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_c, in_c, k, k, generator=g, dtype=torch.float64) / (in_c * k * k) ** 0.5
    return w.to(dtype).to(device)


def per_channel(v):
    return v.double()[:, None, None]


def ref_bn_relu(x, scale, shift):
    return torch.relu(x.double() * per_channel(scale) + per_channel(shift))


def ref_layer(kind, y, w):
    """What the op computes after the BN-ReLU, in torchvision's order."""
    if kind == "conv1x1":
        return F.conv2d(y, w)
    if kind == "conv3x3":
        return F.conv2d(y, w, padding=1)
    return F.avg_pool2d(F.conv2d(y, w), 2)


def ref_backward(kind, grad_out, x, scale, shift, w, center):
    """dy (w.r.t. the BN output), grad_weight, sum(dy), sum(dy * (x - center)) by autograd."""
    v = (x.double() * per_channel(scale) + per_channel(shift)).requires_grad_()
    w64 = w.double().requires_grad_()
    ref_layer(kind, torch.relu(v), w64).backward(grad_out.double())
    dy = v.grad
    return dy, w64.grad, dy.sum((0, 2, 3)), (dy * (x.double() - per_channel(center))).sum((0, 2, 3))


def assert_close(actual, expected, atol, rtol):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def backend(mode):
    return CppBackend(fused_cpu=(mode == "fused"))


# ---- statistics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_channel_stats(dtype, atol, rtol, layout, shape):
    x = buffer_slice(shape, dtype, layout, seed=1, shift=2.0)
    mean, var = CppBackend().channel_stats(x)
    assert mean.dtype == dtype and var.dtype == dtype and mean.shape == (shape[1],)
    assert_close(mean, x.double().mean((0, 2, 3)), atol, rtol)
    assert_close(var, x.double().var((0, 2, 3), unbiased=False), atol, rtol)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_channel_stats_stable_when_mean_dwarfs_std(layout):
    # float32 values around 1e4 with unit spread: sum(x^2) - sum(x)^2/n would lose every digit.
    x = buffer_slice((4, 19, 13, 11), torch.float32, layout, seed=2, shift=1e4)
    mean, var = CppBackend().channel_stats(x)
    exact = x.double()
    torch.testing.assert_close(mean.double(), exact.mean((0, 2, 3)), atol=0, rtol=1e-6)
    torch.testing.assert_close(var.double(), exact.var((0, 2, 3), unbiased=False), atol=0, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_channel_stats_half_precision_in_float32(dtype):
    x = buffer_slice((2, 11, 9, 7), dtype, "nchw", seed=3, shift=1.0)
    mean, var = ops.channel_stats(x)
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    assert_close(mean, x.double().mean((0, 2, 3)), 1e-5, 1e-5)
    assert_close(var, x.double().var((0, 2, 3), unbiased=False), 1e-5, 1e-5)


# ---- per-channel primitives (the arithmetic the CUDA kernels share) ------------------------------


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_affine_relu(dtype, atol, rtol, layout):
    x = buffer_slice((2, 21, 5, 7), dtype, layout, seed=4)
    scale, shift, _ = channel_vectors(21, dtype, seed=5)
    y = ops.affine_relu(x, scale, shift)
    assert y.shape == x.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    assert_close(y, ref_bn_relu(x, scale, shift), atol, rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("accumulate", [False, True])
def test_bn_relu_backward(dtype, atol, rtol, layout, accumulate):
    shape = (3, 17, 6, 5)
    x = buffer_slice(shape, dtype, layout, seed=6)
    grad_y = buffer_slice(shape, dtype, layout, seed=7, offset=1)
    scale, shift, center = channel_vectors(17, dtype, seed=8)
    acc = buffer_slice(shape, dtype, layout, seed=9, offset=5) if accumulate else None
    before = acc.clone() if accumulate else torch.zeros(shape, dtype=torch.float64)
    new, sum_dy, sum_dy_xc = ops.bn_relu_backward(grad_y, x, scale, shift, center, acc)
    mask = (x.double() * per_channel(scale) + per_channel(shift)) > 0
    dy = grad_y.double() * mask
    result = acc if accumulate else new
    assert_close(result, before.double() + per_channel(scale) * dy, atol, rtol)
    assert_close(sum_dy, dy.sum((0, 2, 3)), atol, rtol)
    assert_close(sum_dy_xc, (dy * (x.double() - per_channel(center))).sum((0, 2, 3)), atol, rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bn_grad_finalize(dtype, atol, rtol, layout):
    shape = (2, 23, 7, 3)
    x = buffer_slice(shape, dtype, layout, seed=10)
    grad = buffer_slice(shape, dtype, layout, seed=11, offset=1)
    center, coef_x, coef_c = channel_vectors(23, dtype, seed=12)
    expected = grad.double() + per_channel(coef_x) * (x.double() - per_channel(center)) + per_channel(coef_c)
    CppBackend().bn_grad_finalize(grad, x, center, coef_x, coef_c)
    assert_close(grad, expected, atol, rtol)


# ---- fused layer ops ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_bn_relu_conv1x1(mode, dtype, atol, rtol, layout, shape):
    x = buffer_slice(shape, dtype, layout, seed=20)
    scale, shift, _ = channel_vectors(shape[1], dtype, seed=21)
    w = weight(12, shape[1], 1, dtype, seed=22)
    z, mean, var = backend(mode).bn_relu_conv1x1(x, scale, shift, w, True)
    expected = ref_layer("conv1x1", ref_bn_relu(x, scale, shift), w.double())
    assert z.is_contiguous() and z.dtype == dtype
    assert_close(z, expected, atol, rtol)
    assert_close(mean, expected.mean((0, 2, 3)), atol, rtol)
    assert_close(var, expected.var((0, 2, 3), unbiased=False), atol, rtol)
    z2, none_mean, none_var = backend(mode).bn_relu_conv1x1(x, scale, shift, w, False)
    assert none_mean is None and none_var is None
    assert_close(z2, expected, atol, rtol)


def test_bn_relu_conv1x1_many_tiles():
    # Enough pixels for several tiles per image, so tile edges and the slot merge are exercised.
    x = buffer_slice((3, 600, 17, 15), torch.float64, "nchw", seed=23)
    scale, shift, _ = channel_vectors(600, torch.float64, seed=24)
    w = weight(9, 600, 1, torch.float64, seed=25)
    z, mean, var = CppBackend().bn_relu_conv1x1(x, scale, shift, w, True)
    expected = ref_layer("conv1x1", ref_bn_relu(x, scale, shift), w)
    assert_close(z, expected, 1e-10, 1e-9)
    assert_close(var, expected.var((0, 2, 3), unbiased=False), 1e-10, 1e-9)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_noise", [False, True])
# Maps of at most 2x2 pixels: the fused op's small-map GEMM (the center tap alone for 1x1).
@pytest.mark.parametrize("hw", [(9, 7), (1, 1), (2, 2), (2, 1), (1, 2)])
def test_bn_relu_conv3x3(mode, dtype, atol, rtol, layout, with_noise, hw):
    n, c, (h, w_) = 3, 14, hw
    z = buffer_slice((n, c, h, w_), dtype, layout, seed=30)
    scale, shift, _ = channel_vectors(c, dtype, seed=31)
    w = weight(5, c, 3, dtype, seed=32)
    buf = buffer_slice((n, 11, h, w_), dtype, layout, seed=33, offset=0).contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    untouched = buf.clone()
    out = buf[:, 3:8]
    g = torch.Generator().manual_seed(34)
    noise = (torch.rand(n, 5, h, w_, generator=g) > 0.3).to(dtype) / 0.7 if with_noise else None
    mean, var = backend(mode).bn_relu_conv3x3(z, scale, shift, w, out, noise, True)
    expected = ref_layer("conv3x3", ref_bn_relu(z, scale, shift), w.double())
    if with_noise:
        expected = expected * noise.double()
    assert_close(out, expected, atol, rtol)
    assert_close(mean, expected.mean((0, 2, 3)), atol, rtol)
    assert_close(var, expected.var((0, 2, 3), unbiased=False), atol, rtol)
    # Only the slice was written.
    torch.testing.assert_close(buf[:, :3], untouched[:, :3], atol=0, rtol=0)
    torch.testing.assert_close(buf[:, 8:], untouched[:, 8:], atol=0, rtol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 13, 7, 5), (3, 37, 9, 11), (2, 10, 8, 6)])
def test_bn_relu_pool_conv1x1(mode, dtype, atol, rtol, layout, shape):
    x = buffer_slice(shape, dtype, layout, seed=40)
    scale, shift, _ = channel_vectors(shape[1], dtype, seed=41)
    w = weight(7, shape[1], 1, dtype, seed=42)
    out = backend(mode).bn_relu_pool_conv1x1(x, scale, shift, w)
    expected = ref_layer("pool", ref_bn_relu(x, scale, shift), w.double())
    assert out.shape == expected.shape
    assert_close(out, expected, atol, rtol)


def run_backward(mode, kind, dtype, layout, shape, accumulate, need_weight_grad, seed, out_channels=None):
    n, c, h, w_ = shape
    out_c = out_channels or {"conv1x1": 10, "conv3x3": 6, "pool": 8}[kind]
    x = buffer_slice(shape, dtype, layout, seed=seed)
    scale, shift, center = channel_vectors(c, dtype, seed=seed + 1)
    w = weight(out_c, c, 3 if kind == "conv3x3" else 1, dtype, seed=seed + 2)
    out_hw = (h // 2, w_ // 2) if kind == "pool" else (h, w_)
    g = torch.Generator().manual_seed(seed + 3)
    grad_out = torch.randn((n, out_c) + out_hw, generator=g, dtype=torch.float64).to(dtype)
    acc = buffer_slice(shape, dtype, layout, seed=seed + 4, offset=5) if accumulate else None
    before = acc.clone() if accumulate else None
    b = backend(mode)
    method = {"conv1x1": b.bn_relu_conv1x1_backward, "conv3x3": b.bn_relu_conv3x3_backward,
              "pool": b.bn_relu_pool_conv1x1_backward}[kind]
    result = method(grad_out, x, scale, shift, w, center, acc, need_weight_grad)
    dy, grad_w, sum_dy, sum_dy_xc = ref_backward(kind, grad_out, x, scale, shift, w, center)
    expected_grad_x = per_channel(scale) * dy + (before.double() if accumulate else 0)
    return result, acc, (expected_grad_x, grad_w, sum_dy, sum_dy_xc)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["conv1x1", "conv3x3", "pool"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 13, 7, 5), (3, 37, 9, 11)])
def test_layer_backward_accumulates(mode, kind, dtype, atol, rtol, layout, shape):
    result, acc, expected = run_backward(mode, kind, dtype, layout, shape, True, True, seed=50)
    assert result.grad_x is acc
    assert_close(result.grad_x, expected[0], atol, rtol)
    assert_close(result.grad_weight, expected[1], atol, rtol)
    assert_close(result.sum_dy, expected[2], atol, rtol)
    assert_close(result.sum_dy_xc, expected[3], atol, rtol)
    assert result.sum_dy.dtype == dtype


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["conv1x1", "conv3x3", "pool"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layer_backward_new_gradient(mode, kind, layout):
    # No accumulator: a new gradient (every element written, zeros outside odd pooling windows).
    result, _, expected = run_backward(mode, kind, torch.float64, layout, (2, 9, 7, 9), False, False, seed=60)
    assert result.grad_weight is None
    assert_close(result.grad_x, expected[0], 1e-10, 1e-9)
    assert_close(result.sum_dy, expected[2], 1e-10, 1e-9)
    assert_close(result.sum_dy_xc, expected[3], 1e-10, 1e-9)


def test_conv1x1_backward_many_tiles_channels_last():
    result, _, expected = run_backward("fused", "conv1x1", torch.float64, "channels_last", (2, 300, 23, 21), True,
                                       True, seed=70)
    for actual, want in zip((result.grad_x, result.grad_weight, result.sum_dy, result.sum_dy_xc), expected):
        assert_close(actual, want, 1e-10, 1e-9)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (2, 1), (1, 2)])
def test_conv3x3_backward_of_small_maps(dtype, atol, rtol, layout, accumulate, hw):
    """Maps of at most 2x2 pixels take the small-map GEMMs: the same gradients as the 3x3
    convolution, and exactly zero weight gradients for the taps that only meet padding."""
    result, _, expected = run_backward("fused", "conv3x3", dtype, layout, (5, 21) + hw, accumulate, True, seed=90)
    for actual, want in zip((result.grad_x, result.grad_weight, result.sum_dy, result.sum_dy_xc), expected):
        assert_close(actual, want, atol, rtol)
    taps = torch.arange(3)
    meets_pixels = ((taps - 1).abs() < hw[0]).view(3, 1) & ((taps - 1).abs() < hw[1]).view(1, 3)
    if not meets_pixels.all():
        assert result.grad_weight[:, :, ~meets_pixels].abs().max() == 0
    assert (result.grad_weight[:, :, meets_pixels].abs().amax(dim=(0, 1)) > 0).all()


@pytest.mark.parametrize("need_weight_grad", [False, True])
def test_conv3x3_backward_over_several_chunks(need_weight_grad):
    """A batch over one chunk of normalized activations (2M elements) computes the input gradient
    whole and the weight gradient chunk by chunk; within one chunk both come from one call."""
    result, _, expected = run_backward("fused", "conv3x3", torch.float64, "nchw", (3, 8, 300, 300), True,
                                       need_weight_grad, seed=95)
    assert_close(result.grad_x, expected[0], 1e-10, 1e-9)
    if need_weight_grad:
        assert_close(result.grad_weight, expected[1], 1e-10, 1e-9)
    else:
        assert result.grad_weight is None
    assert_close(result.sum_dy_xc, expected[3], 1e-10, 1e-9)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_many_tiles_float32(threads, layout):
    """float32 over several tiles per image, in one slot or in a slot per thread (at 2 threads,
    with 64 output channels or more, the slots' forward and input-gradient GEMMs run through
    oneDNN where PyTorch has it): the conv1x1 forward, and the conv1x1 and pooling backwards, with
    10 and 72 output channels, against float64."""
    atol, rtol = 1e-4, 1e-4
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        shape = (3, 300, 23, 21)
        x = buffer_slice(shape, torch.float32, layout, seed=97)
        scale, shift, _ = channel_vectors(shape[1], torch.float32, seed=98)
        for out_c in (10, 72):
            w = weight(out_c, shape[1], 1, torch.float32, seed=99)
            z, mean, var = CppBackend().bn_relu_conv1x1(x, scale, shift, w, True)
            expected = ref_layer("conv1x1", ref_bn_relu(x, scale, shift), w.double())
            assert_close(z, expected, atol, rtol)
            assert_close(mean, expected.mean((0, 2, 3)), atol, rtol)
            assert_close(var, expected.var((0, 2, 3), unbiased=False), atol, rtol)
            for kind in ("conv1x1", "pool"):
                for accumulate in (False, True):
                    result, _, want = run_backward("fused", kind, torch.float32, layout, shape, accumulate, True,
                                                   seed=100, out_channels=out_c)
                    for actual, ref in zip((result.grad_x, result.grad_weight, result.sum_dy, result.sum_dy_xc),
                                           want):
                        assert_close(actual, ref, atol, rtol)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", ["conv1x1", "pool"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (3, 5)])
def test_small_maps_grouped_into_multi_image_tiles(threads, kind, layout, hw):
    """Images smaller than a tile share one GEMM (whole images per tile, a tile per thread, the
    last one shorter): forward, statistics and backward as over single images."""
    shape = (5, 19) + hw
    if kind == "pool" and min(hw) < 2:
        shape = (5, 19, 2, 3)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = buffer_slice(shape, torch.float64, layout, seed=80)
        scale, shift, _ = channel_vectors(shape[1], torch.float64, seed=81)
        w = weight(6, shape[1], 1, torch.float64, seed=82)
        expected = ref_layer(kind, ref_bn_relu(x, scale, shift), w)
        if kind == "pool":
            out = CppBackend().bn_relu_pool_conv1x1(x, scale, shift, w)
        else:
            out, mean, var = CppBackend().bn_relu_conv1x1(x, scale, shift, w, True)
            assert_close(mean, expected.mean((0, 2, 3)), 1e-10, 1e-9)
            assert_close(var, expected.var((0, 2, 3), unbiased=False), 1e-10, 1e-9)
        assert_close(out, expected, 1e-10, 1e-9)
        for accumulate in (False, True):
            result, _, want = run_backward("fused", kind, torch.float64, layout, shape, accumulate, True, seed=83)
            for actual, ref in zip((result.grad_x, result.grad_weight, result.sum_dy, result.sum_dy_xc), want):
                assert_close(actual, ref, 1e-10, 1e-9)
    finally:
        torch.set_num_threads(before)


def test_composite_chunks_are_few_and_exact(monkeypatch):
    """The composite path (what CUDA runs) recomputes a prefix in about four chunks of images,
    not one per 2M elements, and chunking does not change the results."""
    prefix = torch.empty(64, 256, 56, 56, device="meta")[:, :192]  # block 1, batch 64, 224^2
    assert len(list(cpp_backend._chunks(prefix))) <= 4
    shape, kinds = (5, 13, 7, 5), ("conv1x1", "conv3x3", "pool")
    x = buffer_slice(shape, torch.float64, "nchw", seed=81)
    scale, shift, _ = channel_vectors(13, torch.float64, seed=82)
    w1, w3 = weight(6, 13, 1, torch.float64, seed=83), weight(4, 13, 3, torch.float64, seed=84)
    composite = backend("composite")

    def forward():
        out = torch.empty(5, 4, 7, 5, dtype=torch.float64)
        stats3 = composite.bn_relu_conv3x3(x, scale, shift, w3, out, None, True)
        return (*composite.bn_relu_conv1x1(x, scale, shift, w1, True), out, *stats3,
                composite.bn_relu_pool_conv1x1(x, scale, shift, w1))

    whole_forward = forward()
    whole = [run_backward("composite", kind, torch.float64, "nchw", shape, True, True, seed=80)[0] for kind in kinds]
    monkeypatch.setattr(cpp_backend, "_MIN_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(cpp_backend, "_CHUNK_SHARE", 10 ** 9)  # one image per chunk
    assert len(list(cpp_backend._chunks(x))) == shape[0]
    for chunked, expected in zip(forward(), whole_forward):
        assert_close(chunked, expected, 1e-12, 1e-12)
    for kind, expected in zip(kinds, whole):
        chunked = run_backward("composite", kind, torch.float64, "nchw", shape, True, True, seed=80)[0]
        for name in ("grad_x", "grad_weight", "sum_dy", "sum_dy_xc"):
            assert_close(getattr(chunked, name), getattr(expected, name), 1e-12, 1e-12)


# ---- argument checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("affine", ["none", "weight", "both"])
@pytest.mark.parametrize("count", [37, 1])
def test_write_stats_matches_its_pytorch_ops(dtype, atol, rtol, affine, count):
    """The C++ rows of a StatsOut (one loop) against interface.write_stats' PyTorch ops, with the
    rows apart in a packed tensor as the stage lays them out; count 1: an unbiased variance of NaN."""
    g = torch.Generator().manual_seed(95)
    c, width = 7, 11
    mean = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    var = torch.rand(c, generator=g, dtype=torch.float64).to(dtype) + 0.1
    weight = torch.randn(c, generator=g).to(dtype) if affine != "none" else None
    bias = torch.randn(c, generator=g).to(dtype) if affine == "both" else None
    results = []
    for write in ("cpp", "torch"):
        packed = torch.full((5 * width,), 7.0, dtype=dtype)
        rows = packed[:3 * width].view(3, width)[:, 2:2 + c]
        coefs = packed[3 * width:3 * width + 2 * c].view(2, c)
        into = StatsOut(rows, 1e-3, coefs, weight, bias)
        if write == "cpp":
            ops.write_stats(rows, mean, var, count, 1e-3, weight, bias, coefs)
        else:
            write_stats(into, mean, var, count)
        results.append(packed)
    torch.testing.assert_close(results[0], results[1], atol=atol, rtol=rtol, equal_nan=True)
    written = torch.zeros(5 * width, dtype=torch.bool)
    written[:3 * width].view(3, width)[:, 2:2 + c] = True
    written[3 * width:3 * width + 2 * c] = True
    assert results[0][~written].eq(7.0).all()  # nothing outside the rows
    assert results[0][width + 2:width + 2 + c].isnan().all() == (count == 1)


def test_errors_name_what_was_expected():
    x = buffer_slice((2, 6, 5, 5), torch.float32, "nchw", seed=80)
    scale, shift, center = channel_vectors(6, torch.float32, seed=81)
    w = weight(4, 6, 1, torch.float32, seed=82)
    with pytest.raises(RuntimeError, match="4-D"):
        ops.channel_stats(x[0])
    with pytest.raises(RuntimeError, match="dtype float32 or float64"):
        ops.bn_relu_conv1x1(x.to(torch.float16), scale, shift, w.half(), False)
    with pytest.raises(RuntimeError, match=r"'scale' of shape \(6,\)"):
        ops.bn_relu_conv1x1(x, scale[:5], shift, w, False)
    with pytest.raises(RuntimeError, match="'shift' of dtype Float"):
        ops.bn_relu_conv1x1(x, scale, shift.double(), w, False)
    with pytest.raises(RuntimeError, match="'weight' of shape"):
        ops.bn_relu_conv1x1(x, scale, shift, weight(4, 5, 1, torch.float32, seed=83), False)
    with pytest.raises(RuntimeError, match="NCHW or channels_last"):
        ops.channel_stats(x.transpose(2, 3).transpose(0, 1))
    with pytest.raises(RuntimeError, match="'out' of shape"):
        ops.bn_relu_conv3x3(x, scale, shift, weight(4, 6, 3, torch.float32, seed=84), torch.empty(2, 3, 5, 5), None,
                            False)
    with pytest.raises(RuntimeError, match="'grad_x' in the layout of 'x'"):
        ops.bn_relu_conv1x1_backward(torch.randn(2, 4, 5, 5), x, scale, shift, w, center,
                                     torch.empty(2, 6, 5, 5).contiguous(memory_format=torch.channels_last), False)
    with pytest.raises(RuntimeError, match="'grad_out' of shape"):
        ops.bn_relu_pool_conv1x1_backward(torch.randn(2, 4, 5, 5), x, scale, shift, w, center, None, False)
    mean, var = torch.rand(6), torch.rand(6)
    with pytest.raises(RuntimeError, match=r"'stats' of shape \(3, 6\)"):
        ops.write_stats(torch.empty(2, 6), mean, var, 10, 1e-5, None, None, None)
    with pytest.raises(RuntimeError, match="the rows of 'coefs' to be contiguous"):
        ops.write_stats(torch.empty(3, 6), mean, var, 10, 1e-5, None, None, torch.empty(6, 2).t())
    with pytest.raises(RuntimeError, match="'var' of dtype Float"):
        ops.write_stats(torch.empty(3, 6), mean, var.double(), 10, 1e-5, None, None, None)
    with pytest.raises(RuntimeError, match="'weight' a floating vector of 6 entries"):
        ops.bn_coefficients(mean, var, torch.ones(5), None, torch.empty(2, 6))
    empty = x[:, :0]  # no channels: a clear error, not a division by zero in the fused loops
    none = torch.empty(0)
    for op, args in [(ops.bn_relu_conv1x1_backward, (torch.randn(2, 4, 5, 5), empty, none, none, w[:, :0], none, None,
                                                     True)),
                     (ops.bn_relu_conv1x1, (empty, none, none, w[:, :0], True))]:
        with pytest.raises(RuntimeError, match=r"'x' with at least one channel, got shape \[2, 0, 5, 5\]"):
            op(*args)


def test_backend_rejects_what_it_cannot_compute():
    b = CppBackend()
    assert b.supports(torch.ones(1, dtype=torch.float32)) is None
    assert b.supports(torch.ones(1, dtype=torch.float64)) is None
    reason = b.supports(torch.ones(1, dtype=torch.bfloat16))
    assert reason.error is TypeError and "float32 or float64" in str(reason)
    assert "CPU and CUDA" in str(b.supports(torch.ones(1, device="meta")))
    b.check_tensors(torch.ones(1, dtype=torch.float32))
    with pytest.raises(TypeError, match="float32 or float64"):
        b.check_tensors(torch.ones(1, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="CPU and CUDA"):
        b.check_tensors(torch.ones(1, device="meta"))


# ---- build, registration, torch.compile -------------------------------------------------------


def test_cuda_kernels_compiled_when_nvcc_present():
    from torch.utils.cpp_extension import CUDA_HOME

    cuda_buildable = torch.version.cuda is not None and CUDA_HOME is not None and shutil.which("nvcc") is not None
    if os.environ.get("DENSENET_FAST_CUDA", "").strip() == "0":
        assert not built_with_cuda()
    elif cuda_buildable:
        assert built_with_cuda(), "nvcc and a CUDA torch are present but the CUDA kernels weren't compiled"


def test_fake_implementations_match_the_kernels():
    x = buffer_slice((2, 7, 6, 5), torch.float32, "channels_last", seed=90)
    scale, shift, center = channel_vectors(7, torch.float32, seed=91)
    w1, w3 = weight(4, 7, 1, torch.float32, seed=92), weight(3, 4, 3, torch.float32, seed=93)
    z = torch.randn(2, 4, 6, 5)
    grad = torch.randn(2, 4, 6, 5)
    cases = [
        (ops.channel_stats, (x,)),
        (ops.affine_relu, (x, scale, shift)),
        (ops.bn_relu_backward, (torch.randn(2, 7, 6, 5), x, scale, shift, center, None)),
        (ops.bn_relu_conv1x1, (x, scale, shift, w1, True)),
        (ops.bn_relu_conv1x1, (x, scale, shift, w1, False)),
        (ops.bn_relu_conv1x1_backward, (grad, x, scale, shift, w1, center, None, True)),
        (ops.bn_relu_conv3x3_backward, (torch.randn(2, 3, 6, 5), z, scale[:4], shift[:4], w3, center[:4], None, False)),
        (ops.bn_relu_pool_conv1x1, (x, scale, shift, w1)),
        (ops.bn_relu_pool_conv1x1_backward, (torch.randn(2, 4, 3, 2), x, scale, shift, w1, center, None, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_ops_trace_under_torch_compile():
    x = buffer_slice((2, 7, 6, 5), torch.float32, "nchw", seed=95)
    scale, shift, _ = channel_vectors(7, torch.float32, seed=96)
    w1 = weight(4, 7, 1, torch.float32, seed=97)

    def layer(x, scale, shift, w):
        z, mean, var = ops.bn_relu_conv1x1(x, scale, shift, w, True)
        m2, v2 = ops.channel_stats(z)
        return z * 2, mean + m2, var - v2

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    for actual, expected in zip(compiled(x, scale, shift, w1), layer(x, scale, shift, w1)):
        torch.testing.assert_close(actual, expected)


def test_missing_extension_raises_a_helpful_import_error(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "densenet_fast._C", None)  # "import densenet_fast._C" now fails
    monkeypatch.delitem(sys.modules, "densenet_fast.ops.cpp_backend")
    with pytest.raises(ImportError, match="pip install --no-build-isolation -e"):
        importlib.import_module("densenet_fast.ops.cpp_backend")
    assert sys.modules.get("densenet_fast.ops.cpp_backend") is None
    monkeypatch.setitem(sys.modules, "densenet_fast.ops.cpp_backend", cpp_backend)


# ---- CUDA (run on a GPU machine by tools/gpu_check) ---------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA_DTYPES = dtype_params("op", torch.float64, torch.float32) + dtype_params("cpp_cuda", torch.float16, torch.bfloat16)


@cuda
@pytest.mark.parametrize("dtype,atol,rtol", CUDA_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_channel_stats(dtype, atol, rtol, layout):
    assert built_with_cuda()
    x = buffer_slice((3, 37, 9, 11), dtype, layout, seed=100, device="cuda", shift=2.0)
    mean, var = ops.channel_stats(x)
    assert mean.device.type == "cuda" and mean.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    exact = x.double()
    assert_close(mean, exact.mean((0, 2, 3)), atol, rtol)
    assert_close(var, exact.var((0, 2, 3), unbiased=False), max(atol, 1e-5), rtol)


@cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_channel_stats_stable_when_mean_dwarfs_std(layout):
    x = buffer_slice((4, 19, 13, 11), torch.float32, layout, seed=101, device="cuda", shift=1e4)
    mean, var = ops.channel_stats(x)
    exact = x.double()
    torch.testing.assert_close(mean.double(), exact.mean((0, 2, 3)), atol=0, rtol=1e-6)
    torch.testing.assert_close(var.double(), exact.var((0, 2, 3), unbiased=False), atol=0, rtol=1e-4)


@cuda
@pytest.mark.parametrize("dtype,atol,rtol", CUDA_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("accumulate", [False, True])
def test_cuda_bn_relu_backward_matches_cpu(dtype, atol, rtol, layout, accumulate):
    shape = (3, 37, 9, 11)
    x = buffer_slice(shape, dtype, layout, seed=102, device="cuda")
    grad_y = buffer_slice(shape, dtype, layout, seed=103, device="cuda", offset=1)
    scale, shift, center = channel_vectors(37, dtype, seed=104, device="cuda")
    acc = buffer_slice(shape, dtype, layout, seed=105, device="cuda", offset=5) if accumulate else None
    before = acc.clone() if accumulate else None
    new, sum_dy, sum_dy_xc = ops.bn_relu_backward(grad_y, x, scale, shift, center, acc)
    # The same arithmetic on CPU in float64 (the kernels share bn_relu_math.h).
    x64, g64 = x.double().cpu(), grad_y.double().cpu()
    s64, b64, c64 = (v.double().cpu() for v in (scale, shift, center))
    acc64 = before.double().cpu() if accumulate else None
    ref_new, ref_dy, ref_dy_xc = ops.bn_relu_backward(g64, x64, s64, b64, c64, acc64)
    assert_close((acc if accumulate else new).cpu(), acc64 if accumulate else ref_new, atol, rtol)
    assert_close(sum_dy.cpu(), ref_dy, atol * 10, rtol)
    assert_close(sum_dy_xc.cpu(), ref_dy_xc, atol * 10, rtol)


@cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_affine_relu_and_finalize(layout):
    shape = (2, 21, 5, 7)
    x = buffer_slice(shape, torch.float32, layout, seed=106, device="cuda")
    scale, shift, center = channel_vectors(21, torch.float32, seed=107, device="cuda")
    assert_close(ops.affine_relu(x, scale, shift).cpu(), ref_bn_relu(x.cpu(), scale.cpu(), shift.cpu()), 1e-5, 1e-5)
    grad = buffer_slice(shape, torch.float32, layout, seed=108, device="cuda", offset=1)
    expected = grad.double().cpu() + per_channel(scale.cpu()) * (x.double().cpu() - per_channel(center.cpu())) + \
        per_channel(shift.cpu())
    ops.bn_grad_finalize(grad, x, center, scale, shift)
    assert_close(grad.cpu(), expected, 1e-5, 1e-5)


@cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 24 << 30,
                    reason="needs a CUDA device with 24 GiB")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_kernels_past_32bit_offsets(layout):
    """Offsets past 2**31 take the kernels' 64-bit index path (fits_32bit): the last elements of a
    2.4G-element float16 tensor come out right (the 32-bit path would wrap around)."""
    n, c, h, w_ = 2, 3, 20000, 20000
    x = torch.empty(n, c, h, w_, dtype=torch.float16, device="cuda")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.normal_(generator=torch.Generator("cuda").manual_seed(120))
    scale, shift, center = channel_vectors(c, torch.float16, seed=121, device="cuda")
    y = ops.affine_relu(x, scale, shift)
    corner = (slice(None), slice(None), slice(h - 3, h), slice(w_ - 4, w_))
    assert_close(y[corner], ref_bn_relu(x[corner], scale, shift).half(), 1e-3, 1e-3)
    mean, var = ops.channel_stats(x)
    var_ref, mean_ref = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    assert_close(mean, mean_ref, 1e-3, 1e-3)
    assert_close(var, var_ref, 1e-3, 1e-3)


@cuda
@pytest.mark.parametrize("kind", ["conv1x1", "conv3x3", "pool"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_backend_layer_backward(kind, layout):
    shape = (3, 37, 9, 11)
    n, c, h, w_ = shape
    out_c = 8
    dtype = torch.float64
    x = buffer_slice(shape, dtype, layout, seed=110, device="cuda")
    scale, shift, center = channel_vectors(c, dtype, seed=111, device="cuda")
    w = weight(out_c, c, 3 if kind == "conv3x3" else 1, dtype, seed=112, device="cuda")
    out_hw = (h // 2, w_ // 2) if kind == "pool" else (h, w_)
    grad_out = torch.randn((n, out_c) + out_hw, dtype=dtype, generator=torch.Generator().manual_seed(113)).cuda()
    acc = buffer_slice(shape, dtype, layout, seed=114, device="cuda", offset=5)
    before = acc.clone()
    b = CppBackend()
    method = {"conv1x1": b.bn_relu_conv1x1_backward, "conv3x3": b.bn_relu_conv3x3_backward,
              "pool": b.bn_relu_pool_conv1x1_backward}[kind]
    r = method(grad_out, x, scale, shift, w, center, acc, True)
    dy, grad_w, sum_dy, sum_dy_xc = ref_backward(kind, grad_out.cpu(), x.cpu(), scale.cpu(), shift.cpu(), w.cpu(),
                                                 center.cpu())
    assert_close(r.grad_x.cpu(), before.double().cpu() + per_channel(scale.cpu()) * dy, 1e-10, 1e-9)
    assert_close(r.grad_weight.cpu(), grad_w, 1e-10, 1e-9)
    assert_close(r.sum_dy.cpu(), sum_dy, 1e-10, 1e-9)
    assert_close(r.sum_dy_xc.cpu(), sum_dy_xc, 1e-10, 1e-9)
