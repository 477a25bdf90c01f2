"""What the compiled extension (csrc/; backends "cpp" and "composite") does beyond the op suite's
checks against densenet_fast.ops.reference (tests/test_<op>.py): its raw per-channel ops
(channel_stats in half precision, affine_relu, bn_relu_backward, write_stats) against plain
references, its argument checks' error messages, its fake implementations and torch.compile, the
ImportError without it, its CUDA kernels (compiled when nvcc is there; against the CPU ones;
64-bit offsets), the composite backend's chunks, and the cpp CPU ops over several tiles at 1 and 2
threads.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

if os.environ.get("DENSENET_FAST_BUILD_EXT", "").strip() == "0":
    pytest.skip("installed with DENSENET_FAST_BUILD_EXT=0: no compiled extension", allow_module_level=True)

from densenet_fast.ops import composite_backend, cpp_backend, reference
from densenet_fast.ops.composite_backend import CompositeBackend
from densenet_fast.ops.cpp_backend import CppBackend, built_with_cuda
from densenet_fast.ops.interface import StatsOut, write_stats
from helpers import dtype_params

ops = torch.ops.densenet_fast

# (dtype, atol, rtol); references are computed in float64 from the same values.
DTYPES = dtype_params("op", torch.float64, torch.float32)
LAYOUTS = ["nchw", "channels_last"]


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
    return reference.bn_relu(x.double(), scale.double(), shift.double())


def assert_close(actual, expected, atol, rtol):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


KINDS = {"conv1x1": "bn_relu_conv1x1_backward", "conv3x3": "bn_relu_conv3x3_backward",
         "pool": "bn_relu_pool_conv1x1_backward"}


def run_backward(backend, kind, dtype, layout, shape, accumulate, seed, out_channels):
    """A backward of ``backend`` against reference's in float64: (ConvGrads, grad_x) and theirs."""
    n, c, h, w_ = shape
    x = buffer_slice(shape, dtype, layout, seed=seed)
    scale, shift, center = channel_vectors(c, dtype, seed=seed + 1)
    w = weight(out_channels, c, 3 if kind == "conv3x3" else 1, dtype, seed=seed + 2)
    out_hw = (h // 2, w_ // 2) if kind == "pool" else (h, w_)
    grad_out = torch.randn((n, out_channels) + out_hw, generator=torch.Generator().manual_seed(seed + 3),
                           dtype=torch.float64).to(dtype)
    grad_x = buffer_slice(shape, dtype, layout, seed=seed + 4, offset=5)
    grad_x64 = grad_x.double()
    op = KINDS[kind]
    result = getattr(backend, op)(grad_out, x, scale, shift, w, center, grad_x, accumulate, True)
    want = getattr(reference, op)(grad_out.double(), x.double(), scale.double(), shift.double(), w.double(),
                                  center.double(), grad_x64, accumulate, True)
    return (result, grad_x), (want, grad_x64)


def assert_backward_close(got, want, atol, rtol):
    (result, grad_x), (expected, grad_x64) = got, want
    assert_close(grad_x, grad_x64, atol, rtol)
    for actual, ref in zip(result, expected):
        assert_close(actual, ref, atol, rtol)


# ---- raw per-channel ops (the arithmetic the CUDA kernels share) ----------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_channel_stats_half_precision_in_float32(dtype):
    x = buffer_slice((2, 11, 9, 7), dtype, "nchw", seed=3, shift=1.0)
    mean, var = ops.channel_stats(x)
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    assert_close(mean, x.double().mean((0, 2, 3)), 1e-5, 1e-5)
    assert_close(var, x.double().var((0, 2, 3), unbiased=False), 1e-5, 1e-5)


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
    acc = buffer_slice(shape, dtype, layout, seed=9, offset=5)
    if not accumulate:
        acc.fill_(float("nan"))  # every element written, the previous contents never read
    before = acc.clone() if accumulate else torch.zeros(shape, dtype=torch.float64)
    sum_dy, sum_dy_xc = ops.bn_relu_backward(grad_y, x, scale, shift, center, acc, accumulate)
    mask = (x.double() * per_channel(scale) + per_channel(shift)) > 0
    dy = grad_y.double() * mask
    assert_close(acc, before.double() + per_channel(scale) * dy, atol, rtol)
    assert_close(sum_dy, dy.sum((0, 2, 3)), atol, rtol)
    assert_close(sum_dy_xc, (dy * (x.double() - per_channel(center))).sum((0, 2, 3)), atol, rtol)


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



# ---- argument checks ----------------------------------------------------------------------------


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
                                     torch.empty(2, 6, 5, 5).contiguous(memory_format=torch.channels_last), False,
                                     False)
    with pytest.raises(RuntimeError, match="expected a tensor for 'grad_x', got None"):
        ops.bn_relu_conv1x1_backward(torch.randn(2, 4, 5, 5), x, scale, shift, w, center, None, False, False)
    with pytest.raises(RuntimeError, match="'grad_out' of shape"):
        ops.bn_relu_pool_conv1x1_backward(torch.randn(2, 4, 5, 5), x, scale, shift, w, center, torch.empty_like(x),
                                          False, False)
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
    for op, args in [(ops.bn_relu_conv1x1_backward, (torch.randn(2, 4, 5, 5), empty, none, none, w[:, :0], none,
                                                     torch.empty(2, 0, 5, 5), False, True)),
                     (ops.bn_relu_conv1x1, (empty, none, none, w[:, :0], True))]:
        with pytest.raises(RuntimeError, match=r"'x' with at least one channel, got shape \[2, 0, 5, 5\]"):
            op(*args)


@pytest.mark.parametrize("backend, devices", [(CppBackend, "CPU tensors"), (CompositeBackend, "CPU and CUDA")])
def test_backend_rejects_what_it_cannot_compute(backend, devices):
    b = backend()
    assert b.supports(torch.ones(1, dtype=torch.float32)) is None
    assert b.supports(torch.ones(1, dtype=torch.float64)) is None
    reason = b.supports(torch.ones(1, dtype=torch.bfloat16))
    assert reason.error is TypeError and "float32 or float64" in str(reason)
    assert devices in str(b.supports(torch.ones(1, device="meta")))
    b.check_tensors(torch.ones(1, dtype=torch.float32))
    with pytest.raises(TypeError, match="float32 or float64"):
        b.check_tensors(torch.ones(1, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match=devices):
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
        (ops.bn_relu_backward, (torch.randn(2, 7, 6, 5), x, scale, shift, center, torch.empty_like(x), False)),
        (ops.bn_relu_conv1x1, (x, scale, shift, w1, True)),
        (ops.bn_relu_conv1x1, (x, scale, shift, w1, False)),
        # 64 outputs: a channels_last bottleneck in float32, NCHW in float64 (bottleneck_format).
        (ops.bn_relu_conv1x1, (x, scale, shift, weight(64, 7, 1, torch.float32, seed=94), True)),
        (ops.bn_relu_conv1x1, (x.double(), scale.double(), shift.double(), weight(64, 7, 1, torch.float64, seed=94),
                               True)),
        (ops.bn_relu_conv1x1_backward, (grad, x, scale, shift, w1, center, torch.empty_like(x), False, True)),
        (ops.bn_relu_conv1x1_backward, (grad, x, scale, shift, w1, center, torch.randn_like(x), True, False)),
        (ops.bn_relu_conv3x3_backward, (torch.randn(2, 3, 6, 5), z, scale[:4], shift[:4], w3, center[:4],
                                        torch.empty_like(z), False, False)),
        (ops.bn_relu_pool_conv1x1, (x, scale, shift, w1)),
        (ops.bn_relu_pool_conv1x1_backward, (torch.randn(2, 4, 3, 2), x, scale, shift, w1, center,
                                             torch.empty_like(x), False, True)),
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
    for module in ("cpp_backend", "composite_backend", "extension_ops"):  # (extension_ops loads the library)
        monkeypatch.delitem(sys.modules, f"densenet_fast.ops.{module}")
    for module in ("cpp_backend", "composite_backend"):
        with pytest.raises(ImportError, match="pip install --no-build-isolation -e"):
            importlib.import_module(f"densenet_fast.ops.{module}")
        assert sys.modules.get(f"densenet_fast.ops.{module}") is None
    monkeypatch.setitem(sys.modules, "densenet_fast.ops.cpp_backend", cpp_backend)
    monkeypatch.setitem(sys.modules, "densenet_fast.ops.composite_backend", composite_backend)


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
    acc = buffer_slice(shape, dtype, layout, seed=105, device="cuda", offset=5)
    if not accumulate:
        acc.fill_(float("nan"))  # every element written, the previous contents never read
    acc64 = acc.double().cpu()
    sum_dy, sum_dy_xc = ops.bn_relu_backward(grad_y, x, scale, shift, center, acc, accumulate)
    # The same arithmetic on CPU in float64 (the kernels share bn_relu_math.h).
    x64, g64 = x.double().cpu(), grad_y.double().cpu()
    s64, b64, c64 = (v.double().cpu() for v in (scale, shift, center))
    ref_dy, ref_dy_xc = ops.bn_relu_backward(g64, x64, s64, b64, c64, acc64, accumulate)
    assert_close(acc.cpu(), acc64, atol, rtol)
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


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_many_tiles_float32(threads, layout):
    """float32 over several tiles per image, in one slot or in a slot per thread: the conv1x1
    forward, and the conv1x1 and pooling backwards, with 10 and 72 output channels (from 64 the
    bottleneck z is channels_last, written as the GEMM's transposed product), against float64."""
    atol, rtol = 1e-4, 1e-4
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        shape = (3, 300, 23, 21)
        x = buffer_slice(shape, torch.float32, layout, seed=97)
        scale, shift, _ = channel_vectors(shape[1], torch.float32, seed=98)
        for out_c in (10, 72):
            w = weight(out_c, shape[1], 1, torch.float32, seed=99)
            got = CppBackend().bn_relu_conv1x1(x, scale, shift, w, True)
            want = reference.bn_relu_conv1x1(x.double(), scale.double(), shift.double(), w.double(), True)
            for actual, expected in zip(got, want):  # z, mean, var
                assert_close(actual, expected, atol, rtol)
            for kind in ("conv1x1", "pool"):
                for accumulate in (False, True):
                    assert_backward_close(*run_backward(CppBackend(), kind, torch.float32, layout, shape, accumulate,
                                                        seed=100, out_channels=out_c), atol, rtol)
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
        if kind == "pool":
            got = (CppBackend().bn_relu_pool_conv1x1(x, scale, shift, w),)
            want = (reference.bn_relu_pool_conv1x1(x, scale, shift, w),)
        else:
            got = CppBackend().bn_relu_conv1x1(x, scale, shift, w, True)
            want = reference.bn_relu_conv1x1(x, scale, shift, w, True)
        for actual, expected in zip(got, want):  # the output, and its mean and variance
            assert_close(actual, expected, 1e-10, 1e-9)
        for accumulate in (False, True):
            assert_backward_close(*run_backward(CppBackend(), kind, torch.float64, layout, shape, accumulate, seed=83,
                                                out_channels=6), 1e-10, 1e-9)
    finally:
        torch.set_num_threads(before)


def test_composite_chunks_are_few_and_exact(monkeypatch):
    """The composite path (what CUDA runs) recomputes a prefix in about four chunks of images,
    not one per 2M elements, and chunking does not change the results."""
    prefix = torch.empty(64, 256, 56, 56, device="meta")[:, :192]  # block 1, batch 64, 224^2
    assert len(list(composite_backend._chunks(prefix))) <= 4
    shape, kinds = (5, 13, 7, 5), ("conv1x1", "conv3x3", "pool")
    x = buffer_slice(shape, torch.float64, "nchw", seed=81)
    scale, shift, _ = channel_vectors(13, torch.float64, seed=82)
    w1, w3 = weight(6, 13, 1, torch.float64, seed=83), weight(4, 13, 3, torch.float64, seed=84)
    composite = CompositeBackend()

    def forward():
        out = torch.empty(5, 4, 7, 5, dtype=torch.float64)
        stats3 = composite.bn_relu_conv3x3(x, scale, shift, w3, out, None, True)
        return (*composite.bn_relu_conv1x1(x, scale, shift, w1, True), out, *stats3,
                composite.bn_relu_pool_conv1x1(x, scale, shift, w1))

    whole_forward = forward()
    whole = [run_backward(composite, kind, torch.float64, "nchw", shape, True, 80, 4)[0] for kind in kinds]
    monkeypatch.setattr(composite_backend, "_MIN_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(composite_backend, "_CHUNK_SHARE", 10 ** 9)  # one image per chunk
    assert len(list(composite_backend._chunks(x))) == shape[0]
    for chunked, expected in zip(forward(), whole_forward):
        assert_close(chunked, expected, 1e-12, 1e-12)
    for kind, (expected, expected_grad_x) in zip(kinds, whole):
        chunked, grad_x = run_backward(composite, kind, torch.float64, "nchw", shape, True, 80, 4)[0]
        assert_close(grad_x, expected_grad_x, 1e-12, 1e-12)
        for actual, want in zip(chunked, expected):  # grad_weight, sum_dy, sum_dy_xc
            assert_close(actual, want, 1e-12, 1e-12)


@pytest.mark.parametrize("kind", ["conv1x1", "conv3x3", "pool"])
def test_empty_batch(kind):
    """The fused CPU ops on a batch of no image, against the reference: empty outputs, NaN
    statistics (the mean and variance of nothing, as torch gives), zero weight gradient and
    reductions. The conv1x1 and pooling ops divided by zero in their tiling before (SIGFPE) and
    the statistics were 0; conv3x3 never tiled."""
    shape = (0, 13, 6, 5)
    x = buffer_slice(shape, torch.float64, "nchw", seed=84)
    scale, shift, _ = channel_vectors(shape[1], torch.float64, seed=85)
    w = weight(7, shape[1], 3 if kind == "conv3x3" else 1, torch.float64, seed=86)
    if kind == "pool":
        got = (CppBackend().bn_relu_pool_conv1x1(x, scale, shift, w),)
        want = (reference.bn_relu_pool_conv1x1(x, scale, shift, w),)
    elif kind == "conv1x1":
        got = CppBackend().bn_relu_conv1x1(x, scale, shift, w, True)
        want = reference.bn_relu_conv1x1(x, scale, shift, w, True)
    else:
        out, out_ref = (torch.empty((0, 7, 6, 5), dtype=torch.float64) for _ in range(2))
        got = (out, *CppBackend().bn_relu_conv3x3(x, scale, shift, w, out, None, True))
        want = (out_ref, *reference.bn_relu_conv3x3(x, scale, shift, w, out_ref, None, True))
    for actual, expected in zip(got, want, strict=True):  # the output, and its mean and variance
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, atol=0, rtol=0, equal_nan=True)
    for accumulate in (False, True):
        assert_backward_close(*run_backward(CppBackend(), kind, torch.float64, "nchw", shape, accumulate, seed=87,
                                            out_channels=7), 1e-10, 1e-9)


@pytest.mark.parametrize("hw", [(5, 1), (1, 4)])
def test_pooling_refuses_maps_under_2x2(hw):
    """A 2x2 average pool of a map 1 pixel wide or high has no window: the pooling ops refuse it,
    as torch's avg_pool2d does (the backward divided by zero before: SIGFPE)."""
    shape = (2, 9) + hw
    x = buffer_slice(shape, torch.float64, "nchw", seed=88)
    scale, shift, center = channel_vectors(shape[1], torch.float64, seed=89)
    w = weight(4, shape[1], 1, torch.float64, seed=90)
    grad_out = torch.ones((2, 4, hw[0] // 2, hw[1] // 2), dtype=torch.float64)
    expected = rf"at least 2x2 pixels .* got {hw[0]}x{hw[1]}"
    with pytest.raises(RuntimeError, match=expected):
        ops.bn_relu_pool_conv1x1(x, scale, shift, w)
    with pytest.raises(RuntimeError, match=expected):
        ops.bn_relu_pool_conv1x1_backward(grad_out, x, scale, shift, w, center, torch.empty_like(x), False, True)
    with pytest.raises(RuntimeError, match="Output size is too small"):
        reference.bn_relu_pool_conv1x1(x, scale, shift, w)
