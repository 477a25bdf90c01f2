"""channel_stats and the producing ops write their statistics, invstd and the next BN's coefficients in place (the op
interface's StatsOut), on every backend: against float64 references, nothing outside the given
slices written. The triton backend does it in the launch that finishes its statistics."""
import pytest
import torch
import torch.nn.functional as F

from densenet_fast.ops import backend_named
from densenet_fast.ops.interface import StatsOut
from helpers import TOLERANCES, backend_params

BACKENDS = backend_params("torch", "cpp", "triton")
# (dtype, atol, rtol) of the float32 kernels against float64 references (float32 statistics).
TOLERANCE = (torch.float32, *TOLERANCES["op"][torch.float32])
EPS = 1e-3  # not BatchNorm's default: the op must use the one it is given


def _seeded(*shape, seed):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _packed(channels: int, seed: int):
    """A stand-in for a stage's packed numbers: (3, W) statistics rows and a (2, channels)
    coefficient block, inside a bigger float32 vector of known values."""
    width = channels + 5
    packed = _seeded(3 * width + 2 * channels + 3, seed=seed).float()
    rows = packed[:3 * width].view(3, width)[:, 2:2 + channels]
    coefs = packed[3 * width + 1:3 * width + 1 + 2 * channels].view(2, channels)
    return packed, rows, coefs


def _expected(produced: torch.Tensor, weight, bias):
    mean = produced.mean((0, 2, 3))
    var = produced.var((0, 2, 3), unbiased=False)
    invstd = (var + EPS).rsqrt()
    scale = invstd if weight is None else weight.double() * invstd
    shift = -mean * scale if bias is None else bias.double() - mean * scale
    # The variance row holds the unbiased variance (running stats take it); invstd the biased one's.
    return torch.stack([mean, produced.var((0, 2, 3), unbiased=True), invstd]), torch.stack([scale, shift])


def _assert_only_slices_written(packed, before, rows, coefs):
    mask = torch.ones_like(packed, dtype=torch.bool)
    for view in (rows, coefs):
        written = torch.zeros_like(packed, dtype=torch.bool)
        written.as_strided(view.shape, view.stride(), view.storage_offset()).fill_(True)
        mask &= ~written
    torch.testing.assert_close(packed[mask], before[mask], atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("op", ["conv1x1", "conv3x3"])
@pytest.mark.parametrize("affine", ["weight_and_bias", "none"])
def test_statistics_and_coefficients_written_in_place(backend, op, affine):
    dtype, atol, rtol = TOLERANCE
    n, c_in, c_out, h, w = 3, 13, 11, 5, 7
    x = _seeded(n, c_in + 4, h, w, seed=1).to(dtype)[:, 2:2 + c_in]  # a channel slice of a buffer
    scale = _seeded(c_in, seed=2).float()
    shift = 0.5 * _seeded(c_in, seed=3).float()
    kernel = 1 if op == "conv1x1" else 3
    weight = (_seeded(c_out, c_in, kernel, kernel, seed=4) / (c_in * kernel * kernel) ** 0.5).to(dtype)
    # Strided, as a parameter may be: the ops read them with their strides.
    bn_weight = _seeded(2 * c_out, seed=5).float()[::2] if affine != "none" else None
    bn_bias = _seeded(2 * c_out, seed=6).float()[::2] if affine != "none" else None
    packed, rows, coefs = _packed(c_out, seed=7)
    before = packed.clone()
    into = StatsOut(rows, EPS, coefs, bn_weight, bn_bias)
    ops = backend_named(backend)
    y = torch.relu(x.double() * scale.double()[:, None, None] + shift.double()[:, None, None])
    if op == "conv1x1":
        z, mean, var = ops.bn_relu_conv1x1(x, scale, shift, weight, True, into)
        produced = F.conv2d(y, weight.double())
        torch.testing.assert_close(z.double(), produced, atol=atol, rtol=rtol)
    else:
        out = torch.empty(n, c_out, h, w, dtype=dtype)
        mean, var = ops.bn_relu_conv3x3(x, scale, shift, weight, out, None, True, into)
        produced = F.conv2d(y, weight.double(), padding=1)
        torch.testing.assert_close(out.double(), produced, atol=atol, rtol=rtol)
    assert mean is None and var is None
    want_rows, want_coefs = _expected(produced, bn_weight, bn_bias)
    torch.testing.assert_close(rows.double(), want_rows, atol=atol, rtol=rtol)
    torch.testing.assert_close(coefs.double(), want_coefs, atol=atol, rtol=rtol)
    _assert_only_slices_written(packed, before, rows, coefs)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_statistics_only_leave_the_coefficients_alone(backend):
    dtype, atol, rtol = TOLERANCE
    x = _seeded(2, 6, 4, 3, seed=11).to(dtype)
    scale, shift = _seeded(6, seed=12).float(), _seeded(6, seed=13).float()
    weight = (_seeded(5, 6, 3, 3, seed=14) / 54 ** 0.5).to(dtype)
    packed, rows, _ = _packed(5, seed=15)
    before = packed.clone()
    out = torch.empty(2, 5, 4, 3, dtype=dtype)
    backend_named(backend).bn_relu_conv3x3(x, scale, shift, weight, out, None, True, StatsOut(rows, EPS))
    y = torch.relu(x.double() * scale.double()[:, None, None] + shift.double()[:, None, None])
    want_rows, _ = _expected(F.conv2d(y, weight.double(), padding=1), None, None)
    torch.testing.assert_close(rows.double(), want_rows, atol=atol, rtol=rtol)
    _assert_only_slices_written(packed, before, rows, rows)  # the coefficient block included


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_channel_stats_written_in_place_as_x_is_copied(backend, channels_last):
    """A stage's input channels: mean, unbiased variance and invstd with the eps it is given, and x
    copied into the first channels of the stage's buffer, nothing past them written."""
    dtype, atol, rtol = TOLERANCE
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (3 * _seeded(3, 9, 5, 7, seed=21) + 2).to(dtype).contiguous(memory_format=fmt)[:, 1:8]
    buf = _seeded(3, 11, 5, 7, seed=23).to(dtype).contiguous(memory_format=fmt)
    buf_before = buf.clone()
    packed, rows, _ = _packed(7, seed=22)
    before = packed.clone()
    assert backend_named(backend).channel_stats(x, StatsOut(rows, EPS), buf[:, :7]) == (None, None)
    want_rows, _ = _expected(x.double(), None, None)
    torch.testing.assert_close(rows.double(), want_rows, atol=atol, rtol=rtol)
    _assert_only_slices_written(packed, before, rows, rows)
    torch.testing.assert_close(buf[:, :7], x, atol=0, rtol=0)
    torch.testing.assert_close(buf[:, 7:], buf_before[:, 7:], atol=0, rtol=0)
