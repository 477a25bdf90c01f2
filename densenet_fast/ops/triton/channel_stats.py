"""Per-channel batch mean and biased variance of an N x C x H x W tensor (any collapsible strides).

One program per (tile of the batch's pixels, channel tile) writes the tile's mean and its sum of
squared deviations from the tile mean; ``finalize_stats`` combines the tiles with Chan's formula.
Used for a block's input channels; the channels a block writes get their statistics from the conv
epilogues.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import collapsible, launch, pixel_rows, pow2_block, ref_stats, row_align, strides_nchw, tile_stats
from .partials import finalize_stats, new_stats_partials, store_tile_partials

# Pixels per tile; larger than the GEMM tiles since a tile here is only loaded and reduced.
_TILE_P = 256


@triton.jit(do_not_specialize=["M", "R", "n_c_tiles"])
def _channel_stats_kernel(
    x_ptr, p_ptr, C, M, HW, R, n_c_tiles, s_n, s_c, s_hw,
    ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0) // n_c_tiles
    offs_c = (tl.program_id(0) % n_c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    p_ok, _, _, rows = pixel_rows(pid_m, M, HW, s_n, s_hw, BLOCK_P, ALIGN)
    valid = p_ok[:, None] & c_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] + offs_c[None, :] * s_c, mask=valid, other=0.0)
    count = tl.minimum(BLOCK_P, M - pid_m * BLOCK_P).to(tl.float32)
    mean, m2 = tile_stats(x.to(tl.float32), valid, count)
    store_tile_partials(p_ptr, C, R, pid_m, offs_c, c_ok, mean, m2)


@torch.library.triton_op("densenet_fast_triton::channel_stats", mutates_args=())
def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Float32 per-channel (mean, biased variance) over N, H, W."""
    n, c, h, w = x.shape
    x = collapsible(x)
    m = n * h * w
    tile_p = _TILE_P  # tiles span images: one size for every map (fewer variants to compile)
    block_c = pow2_block(c, 16, 32)
    rows, n_c_tiles = triton.cdiv(m, tile_p), triton.cdiv(c, block_c)
    partials = new_stats_partials(c, rows, x.device)
    launch(_channel_stats_kernel)[(rows * n_c_tiles,)](
        x, partials, c, m, h * w, rows, n_c_tiles, *strides_nchw(x),
        ALIGN=row_align(x), BLOCK_P=tile_p, BLOCK_C=block_c, num_warps=4)
    return finalize_stats(partials, m, tile_p)


def channel_stats_ref(x: Tensor) -> tuple[Tensor, Tensor]:
    """PyTorch reference of :func:`channel_stats` (float64 math)."""
    return ref_stats(x)
