"""Per-channel batch mean and biased variance of an N x C x H x W tensor (any collapsible strides).

One program per (tile of the batch's pixels, channel tile) writes the tile's mean and its sum of
squared deviations from the tile mean; ``finalize_stats`` combines the tiles with Chan's formula.
Used for a block's input channels; the channels a block writes get their statistics from the conv
epilogues.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import collapsible, launch, pixel_rows, pow2_block, row_align, strides_nchw, tile_stats
from .partials import finalize_stats, new_stats_partials, no_stats, store_tile_partials

# Pixels per tile; larger than the GEMM tiles since a tile here is only loaded and reduced.
_TILE_P = 256


@triton.jit(do_not_specialize=["M", "R", "n_c_tiles"])
def _channel_stats_kernel(
    x_ptr, p_ptr, out_ptr, C, M, HW, R, n_c_tiles, s_n, s_c, s_hw, s_on, s_oc, s_ohw,
    COPY: tl.constexpr, ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0) // n_c_tiles
    offs_c = (tl.program_id(0) % n_c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    p_ok, _, _, rows = pixel_rows(pid_m, M, HW, s_n, s_hw, BLOCK_P, ALIGN)
    valid = p_ok[:, None] & c_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] + offs_c[None, :] * s_c, mask=valid, other=0.0)
    if COPY:
        _, _, _, out_rows = pixel_rows(pid_m, M, HW, s_on, s_ohw, BLOCK_P, ALIGN)
        tl.store(out_ptr + out_rows[:, None] + offs_c[None, :] * s_oc, x, mask=valid)
    count = tl.minimum(BLOCK_P, M - pid_m * BLOCK_P).to(tl.float32)
    mean, m2 = tile_stats(x.to(tl.float32), valid, count)
    store_tile_partials(p_ptr, C, R, pid_m, offs_c, c_ok, mean, m2)


def channel_stats(x: Tensor, stats_into: Optional[Tensor] = None, coefs_into: Optional[Tensor] = None,
                  bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
                  eps: float = 0.0, out: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Float32 per-channel (mean, biased variance) over N, H, W; empty when written into
    ``stats_into`` with what follows (``finalize_stats``). With ``out`` (x's shape and dtype) the
    kernel also copies x there as it reads it."""
    return _channel_stats_op(x, stats_into, coefs_into, bn_weight, bn_bias, eps, out)


# No default arguments (see bn_relu_conv3x3.py): the Python wrapper above keeps them.
@torch.library.triton_op("densenet_fast_triton::channel_stats", mutates_args={"stats_into", "coefs_into", "out"})
def _channel_stats_op(x: Tensor, stats_into: Optional[Tensor], coefs_into: Optional[Tensor],
                      bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float,
                      out: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    n, c, h, w = x.shape
    x = collapsible(x)
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype):
        raise ValueError(f"channel_stats copies x into an out of its shape {tuple(x.shape)} and dtype {x.dtype}, "
                         f"got {tuple(out.shape)} {out.dtype}")
    target = None if out is None else (out if collapsible(out) is out else out.contiguous())
    m = n * h * w
    tile_p = _TILE_P  # tiles span images: one size for every map (fewer variants to compile)
    block_c = pow2_block(c, 16, 32)
    rows, n_c_tiles = triton.cdiv(m, tile_p), triton.cdiv(c, block_c)
    partials = new_stats_partials(c, rows, x.device)
    launch(_channel_stats_kernel)[(rows * n_c_tiles,)](
        x, partials, x if target is None else target, c, m, h * w, rows, n_c_tiles, *strides_nchw(x),
        *strides_nchw(x if target is None else target), COPY=target is not None,
        ALIGN=min(row_align(x), row_align(x if target is None else target)), BLOCK_P=tile_p, BLOCK_C=block_c,
        num_warps=4)
    if target is not None and target is not out:
        out.copy_(target)
    if stats_into is not None:
        finalize_stats(partials, m, tile_p, stats_into, coefs_into, bn_weight, bn_bias, eps)
        return no_stats(x.device)
    return finalize_stats(partials, m, tile_p)
