"""Per-channel batch mean and biased variance of an N x C x H x W tensor (any collapsible strides).

One program per (pixel tile, image, channel tile) writes the tile's sum and its sum of squared
deviations from the tile mean; ``finalize_stats`` combines the tiles with Chan's formula. Used for
a block's input channels; the channels a block writes get their statistics from the conv epilogues.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import collapsible, finalize_stats, launch, new_partials, pow2_block, ref_stats, strides_nchw, tile_stats

# Pixels per tile; larger than the GEMM tiles since a tile here is only loaded and reduced.
_TILE_P = 256


@triton.jit(do_not_specialize=["C"])
def _channel_stats_kernel(
    x_ptr, pmean_ptr, pm2_ptr, C, HW, s_n, s_c, s_hw,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    valid = (offs_p < HW)[:, None] & c_ok[None, :]
    x = tl.load(x_ptr + n * s_n + offs_p[:, None] * s_hw + offs_c[None, :] * s_c, mask=valid, other=0.0)
    count = tl.minimum(BLOCK_P, HW - pid_p * BLOCK_P).to(tl.float32)
    mean, m2 = tile_stats(x.to(tl.float32), valid, tl.arange(0, BLOCK_P) == 0, count)
    row = n * tl.num_programs(0) + pid_p
    tl.store(pmean_ptr + row * C + offs_c, mean, mask=c_ok)
    tl.store(pm2_ptr + row * C + offs_c, m2, mask=c_ok)


@torch.library.triton_op("densenet_fast_triton::channel_stats", mutates_args=())
def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Float32 per-channel (mean, biased variance) over N, H, W."""
    n, c, h, w = x.shape
    x = collapsible(x)
    hw = h * w
    tile_p = min(_TILE_P, triton.next_power_of_2(hw))
    block_c = pow2_block(c, 16, 32)
    grid = (triton.cdiv(hw, tile_p), n, triton.cdiv(c, block_c))
    pmean, pm2 = new_partials(grid[0] * n, c, x.device)
    launch(_channel_stats_kernel)[grid](x, pmean, pm2, c, hw, *strides_nchw(x),
                                        BLOCK_P=tile_p, BLOCK_C=block_c, num_warps=4)
    return finalize_stats(pmean, pm2, hw, tile_p)


def channel_stats_ref(x: Tensor) -> tuple[Tensor, Tensor]:
    """PyTorch reference of :func:`channel_stats` (float64 math)."""
    return ref_stats(x)
