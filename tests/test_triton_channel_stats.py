"""channel_stats (Triton) against channel_stats_ref: per-channel mean and biased variance of prefix
views and slices of NCHW / channels_last buffers, and a large mean that would cancel a naive
sum-of-squares variance."""
import pytest
import torch

from densenet_fast.ops.triton import channel_stats, channel_stats_ref
from helpers import dtype_params
from triton_cases import DEVICE

# float16 and bfloat16: statistics of the same half-precision values, accumulated in float32.
DTYPES = dtype_params("stats", torch.float32, torch.float16, torch.bfloat16, cuda_only=(torch.bfloat16,))
# (N, buffer channels, channel offset, channels, H, W): several pixel tiles (23 x 25 > 256).
SHAPES = [(1, 5, 0, 5, 3, 5), (2, 40, 3, 37, 23, 25), (3, 17, 0, 12, 1, 7)]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_ref(shape, channels_last, dtype, atol, rtol):
    torch.manual_seed(0)
    n, c_buf, offset, c, h, w = shape
    buf = (torch.randn(n, c_buf, h, w, device=DEVICE) * 2 + 0.5).to(dtype)
    if channels_last:
        buf = buf.contiguous(memory_format=torch.channels_last)
    x = buf[:, offset:offset + c]
    mean, var = channel_stats(x)
    mean_ref, var_ref = channel_stats_ref(x)
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean, mean_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(var, var_ref, atol=atol, rtol=rtol)


def test_large_mean_does_not_cancel():
    torch.manual_seed(1)
    x = (1000.0 + 0.01 * torch.randn(4, 3, 20, 20, device=DEVICE))
    mean, var = channel_stats(x)
    mean_ref, var_ref = channel_stats_ref(x)
    # float32 sum-of-squares would lose the 1e-4 variance entirely (1e6 * 2**-24 ~ 0.06)
    torch.testing.assert_close(mean, mean_ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(var, var_ref, atol=0, rtol=1e-3)



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


def test_stats_over_many_channels():
    """300 channels of an 8x8 map: finalize programs of two channels each, tiles spanning images."""
    torch.manual_seed(3)
    x = torch.randn(2, 300, 8, 8, device=DEVICE) * 3 - 1
    mean, var = channel_stats(x)
    mean_ref, var_ref = channel_stats_ref(x)
    torch.testing.assert_close(mean, mean_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var, var_ref, atol=1e-5, rtol=1e-5)


def test_copy_target_of_another_shape_is_refused():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 4, 5, device=DEVICE)
    with pytest.raises(ValueError, match=r"copies x into an out of its shape \(2, 3, 4, 5\)"):
        channel_stats(x, out=torch.empty(2, 4, 4, 5, device=DEVICE))
