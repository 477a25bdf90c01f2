"""channel_stats on every backend against densenet_fast.ops.reference: per-channel mean and biased
variance of NCHW and channels_last tensors and of channel slices of wider buffers (channel prefixes
and odd offsets); with a StatsOut (mean, unbiased variance, invstd written into rows of packed
numbers) and the copy of x into the stage buffer; values whose mean dwarfs their spread."""
import pytest
import torch

from densenet_fast.ops.interface import StatsOut
from helpers import LAYOUTS, check_op, op_cases, op_tensor, seeded

# (N, C, H, W, channel offset of the views): batch 1, odd sizes, several pixel tiles (23 x 25 > 256),
# 1-pixel-high maps, 300 channels (Triton's finalize programs of two channels, tiles across images).
SHAPES = [(1, 13, 7, 5, 3), (3, 37, 9, 11, 3), (1, 5, 3, 5, 0), (2, 37, 23, 25, 3), (3, 12, 1, 7, 0),
          (2, 300, 8, 8, 0)]
EPS = 1e-3  # not BatchNorm's default: the op must use the one it is given


def _x(case, shape, layout, seed=1):
    n, c, h, w, offset = shape
    return op_tensor((n, c, h, w), case, layout, seed, offset=offset, mean=2.0, std=2.0)


def packed_rows(channels: int, case, seed: int, coefs: bool = False):
    """A stand-in for a stage's packed numbers: (3, C) statistics rows apart in a (3, C + 5) block,
    and a (2, C) coefficient block after it, in a bigger vector of known values (statistics dtype)."""
    width = channels + 5
    packed = seeded(3 * width + 2 * channels + 3, seed).to(device=case.device, dtype=case.stats_dtype)
    rows = packed[:3 * width].view(3, width)[:, 2:2 + channels]
    block = packed[3 * width + 1:3 * width + 1 + 2 * channels].view(2, channels)
    return (packed, rows, block) if coefs else (packed, rows)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case, shape", op_cases("stats", SHAPES))
def test_channel_stats(case, shape, layout):
    check_op(case, "channel_stats", _x(case, shape, layout))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case, shape", op_cases("stats", [(3, 7, 5, 7, 1), (2, 37, 23, 25, 0)]))
def test_written_in_place_as_x_is_copied(case, shape, layout):
    """A stage's input channels: mean, unbiased variance and invstd with the eps it is given into
    rows of the packed numbers (nothing else there written), and x copied exactly into the first
    channels of the stage's buffer (nothing past them written)."""
    n, c, h, w, offset = shape
    x = _x(case, shape, layout, seed=21)
    buf = op_tensor((n, c + 4, h, w), case, layout.removesuffix("_view"), seed=23)
    _, rows = packed_rows(c, case, seed=22)
    result, (x_after, into, out) = check_op(case, "channel_stats", x, StatsOut(rows, EPS), buf[:, :c])
    assert result == (None, None)
    assert torch.equal(out, x_after)


# (mean, spread, (mean atol, mean rtol), (var atol, var rtol)): float32 values around 1e4 with unit
# spread, where sum(x^2) - sum(x)^2 / n would lose every digit; around 1000 with a spread of 0.01,
# where a float32 sum of squares would lose the 1e-4 variance entirely (1e6 * 2**-24 ~ 0.06).
# The bounds are the cpp CPU kernels' (the 1e4 case) and the Triton kernels' (the 1e3 case); OTHERWISE
# gives the bounds of the backends held to a case only since the suite runs every case on every
# backend: what they reach (the measured error, rounded up to the next 1, 2 or 5).
DWARFED = {"1e4_unit": (1e4, 1.0, (0.0, 1e-6), (0.0, 1e-5)), "1e3_spread_0.01": (1e3, 0.01, (1e-4, 0.0), (0.0, 1e-3))}
OTHERWISE = {
    # the extension's CUDA kernels: their accumulation order
    ("composite", "cuda", "1e4_unit"): ((0.0, 1e-6), (0.0, 1e-4)),
    # Triton's tile partials merged in float32 (Chan's): 6.2e-5 relative
    ("triton", "cpu", "1e4_unit"): ((0.0, 1e-6), (0.0, 1e-4)),
    ("triton", "cuda", "1e4_unit"): ((0.0, 1e-6), (0.0, 1e-4)),
    # ATen's batch_norm_update_stats (float32 sums over channels_last rows): 1.5e-5 relative, and
    # a mean 4e-4 off at 1000 (4 ulps) and its 1e-4 variance 1.7e-3 relative
    ("torch", "cpu", "1e4_unit"): ((0.0, 1e-6), (0.0, 2e-5)),
    ("torch", "cpu", "1e3_spread_0.01"): ((1e-3, 0.0), (0.0, 5e-3)),
}


@pytest.mark.parametrize("values", list(DWARFED))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case, shape", op_cases("stats", dtypes=(torch.float32,)))
def test_stable_when_the_mean_dwarfs_the_spread(case, shape, layout, values):
    mean, spread, mean_tol, var_tol = DWARFED[values]
    mean_tol, var_tol = OTHERWISE.get((case.backend, case.device, values), (mean_tol, var_tol))
    b = case.open()
    x = op_tensor((4, 19, 13, 11), case, layout, seed=2, mean=mean, std=spread)
    got_mean, got_var = b.channel_stats(x)
    exact = x.double()
    torch.testing.assert_close(got_mean.double(), exact.mean((0, 2, 3)), atol=mean_tol[0], rtol=mean_tol[1])
    torch.testing.assert_close(got_var.double(), exact.var((0, 2, 3), unbiased=False), atol=var_tol[0],
                               rtol=var_tol[1])
