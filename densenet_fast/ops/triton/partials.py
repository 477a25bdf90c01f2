"""Per-tile partial results of the fused kernels, and the kernels that finish them on the GPU.

Statistics. A kernel that produces a tensor whose batch statistics are needed writes, per tile of
TILE_P rows (pixels of the batch, see common.py) and channel, the tile's mean and its sum of squared
deviations from that mean, channel-major: ``partials[0, c, r]`` and ``partials[1, c, r]``.
``finalize_stats`` combines them with Chan's parallel formula, so no sum of squares of raw values is
ever formed and large means do not cancel the variance away. Channel-major rows make each channel's
partials contiguous: one program per few channels reads them coalesced, every channel in parallel.

Sums. Partial sums (the backward's per-tile sum(dy), sum(dy * xc); the weight-gradient GEMMs'
splits) are summed in a fixed order by ``sum_partials``: deterministic, no atomics, and the cast to
the output dtype happens in the same kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import axis_sum, launch


def new_stats_partials(channels: int, rows: int, device: torch.device) -> Tensor:
    """Float32 (2, channels, rows) partials: every entry is written by a kernel."""
    return torch.empty((2, channels, rows), dtype=torch.float32, device=device)


@triton.jit
def store_tile_partials(p_ptr, C, R, row, offs_c, c_ok, first, second):
    """Writes a tile's pair of per-channel partials (mean and M2, or two sums) of channels ``offs_c``
    into row ``row`` of (2, C, R) partials."""
    tl.store(p_ptr + offs_c * R + row, first, mask=c_ok)
    tl.store(p_ptr + (C + offs_c) * R + row, second, mask=c_ok)


@triton.jit
def _tile_means(p_ptr, t0, R, M, offs_c, c_ok, TILE_P: tl.constexpr, BLOCK_T: tl.constexpr):
    """Partials rows t0 .. t0 + BLOCK_T of channels ``offs_c``: (their offsets, mask, pixel counts, means)."""
    offs_t = t0 + tl.arange(0, BLOCK_T)
    idx = offs_c[:, None] * R + offs_t[None, :]
    ok = c_ok[:, None] & (offs_t < R)[None, :]
    count = tl.minimum(TILE_P, M - offs_t * TILE_P).to(tl.float32)
    return idx, ok, count[None, :], tl.load(p_ptr + idx, mask=ok, other=0.0)


@triton.jit
def _stats_finalize_kernel(p_ptr, mean_ptr, var_ptr, C, R, M,
                           TILE_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    total = M.to(tl.float32)
    # The mean as the first tile's mean plus the count-weighted deviations of every tile's mean
    # from it: no sum of raw values is ever formed.
    m0 = tl.load(p_ptr + offs_c * R, mask=c_ok, other=0.0)
    acc = tl.full([BLOCK_C], 0.0, tl.float32)
    for t0 in range(0, R, BLOCK_T):
        _, ok, count, m = _tile_means(p_ptr, t0, R, M, offs_c, c_ok, TILE_P, BLOCK_T)
        acc += axis_sum(tl.where(ok, count * (m - m0[:, None]), 0.0), 1)
    mean = m0 + acc / total
    m2 = tl.full([BLOCK_C], 0.0, tl.float32)
    for t0 in range(0, R, BLOCK_T):
        idx, ok, count, m = _tile_means(p_ptr, t0, R, M, offs_c, c_ok, TILE_P, BLOCK_T)
        q = tl.load(p_ptr + C * R + idx, mask=ok, other=0.0)
        d = m - mean[:, None]
        m2 += axis_sum(tl.where(ok, q + count * d * d, 0.0), 1)
    tl.store(mean_ptr + offs_c, mean, mask=c_ok)
    tl.store(var_ptr + offs_c, m2 / total, mask=c_ok)


def finalize_stats(partials: Tensor, m: int, tile_p: int) -> tuple[Tensor, Tensor]:
    """Mean and biased variance (float32) over ``m`` rows from (2, C, R) partials of ``tile_p``-row tiles."""
    _, channels, rows = partials.shape
    mean = torch.empty(channels, dtype=torch.float32, device=partials.device)
    var = torch.empty_like(mean)
    # A program reduces BLOCK_C channels' rows BLOCK_T at a time: up to 2048 values per step, and
    # one channel per program when there are few rows per channel and many channels (or the reverse).
    block_t = 1024 if rows > 256 else (256 if rows > 64 else 64)
    block_c = max(1, min(16, 2048 // block_t, triton.next_power_of_2(max(1, channels // 128))))
    launch(_stats_finalize_kernel)[(triton.cdiv(channels, block_c),)](
        partials, mean, var, channels, rows, m, TILE_P=tile_p, BLOCK_C=block_c, BLOCK_T=block_t, num_warps=4)
    return mean, var


@triton.jit
def _sum_columns(p_ptr, R, s_r, s_c, offs_c, c_ok, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    acc = tl.full([BLOCK_C], 0.0, tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        ok = (offs_r < R)[:, None] & c_ok[None, :]
        acc += axis_sum(tl.load(p_ptr + offs_r[:, None] * s_r + offs_c[None, :] * s_c, mask=ok, other=0.0), 0)
    return acc


@triton.jit
def _sum_partials_kernel(p_ptr, out_ptr, out2_ptr, R, C, s_r, s_c, s_pair, inner,
                         PAIR: tl.constexpr, TRANSPOSE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    acc = _sum_columns(p_ptr, R, s_r, s_c, offs_c, c_ok, BLOCK_R, BLOCK_C)
    if TRANSPOSE:  # column c = (a, b) of an (A, inner) matrix goes to (b, a)
        out_offs = (offs_c % inner) * (C // inner) + offs_c // inner
    else:
        out_offs = offs_c
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=c_ok)
    if PAIR:
        acc2 = _sum_columns(p_ptr + s_pair, R, s_r, s_c, offs_c, c_ok, BLOCK_R, BLOCK_C)
        tl.store(out2_ptr + offs_c, acc2.to(out2_ptr.dtype.element_ty), mask=c_ok)


def _sum(partials: Tensor, outs: tuple[Tensor, ...], rows: int, cols: int, s_r: int, s_c: int, s_pair: int,
         inner: int = 0) -> None:
    if s_c == 1:  # summing over the slow axis (the splits of a weight gradient): wide rows
        block_r, block_c = 8, 256
    else:  # over the contiguous axis (the tiles of each channel): long rows, a few channels per program
        block_r, block_c = 256, 8
    launch(_sum_partials_kernel)[(triton.cdiv(cols, block_c),)](
        partials, outs[0], outs[-1], rows, cols, s_r, s_c, s_pair, inner,
        PAIR=len(outs) == 2, TRANSPOSE=inner > 0, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)


def sum_pair_partials(partials: Tensor) -> tuple[Tensor, Tensor]:
    """The two per-channel float32 sums over R of (2, C, R) partials, in one kernel."""
    _, channels, rows = partials.shape
    outs = (torch.empty(channels, dtype=torch.float32, device=partials.device),
            torch.empty(channels, dtype=torch.float32, device=partials.device))
    _sum(partials, outs, rows, channels, partials.stride(2), partials.stride(1), partials.stride(0))
    return outs


def sum_partials(partials: Tensor, dtype: torch.dtype, transpose: bool = False) -> Tensor:
    """``partials.sum(0).to(dtype)`` of float32 partials (splits, ...), in one kernel, splits summed in
    order; with ``transpose``, partials (splits, A, B) give the (B, A) transpose of their sum."""
    flat = partials.view(partials.shape[0], -1)
    shape = (partials.shape[2], partials.shape[1]) if transpose else partials.shape[1:]
    out = torch.empty(shape, dtype=dtype, device=partials.device)
    _sum(flat, (out,), flat.shape[0], flat.shape[1], flat.stride(0), flat.stride(1), 0,
         partials.shape[2] if transpose else 0)
    return out
