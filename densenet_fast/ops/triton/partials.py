"""Per-tile partial results of the fused kernels, and the kernels that finish them on the GPU.

Statistics. A kernel that produces a tensor whose batch statistics are needed writes, per tile of
TILE_P rows (pixels of the batch, see common.py) and channel, the tile's mean and its sum of squared
deviations from that mean, channel-major: ``partials[0, c, r]`` and ``partials[1, c, r]``.
``finalize_stats`` combines them with Chan's parallel formula, so no sum of squares of raw values is
ever formed and large means do not cancel the variance away. Given where to put them, it writes the
statistics straight into the stage's packed numbers, with the invstd and the BN coefficients they
give (the op interface's ``StatsOut``): one launch where the bookkeeping took four to seven.
Channel-major rows make each channel's partials contiguous: one program per few channels reads them
coalesced, every channel in parallel.

Sums. Partial sums (the backward's per-tile sum(dy), sum(dy * xc); the weight-gradient GEMMs'
splits) are summed in a fixed order by ``sum_partials``: deterministic, no atomics, the weight
gradient's transpose and cast to its dtype in the same kernel, and both jobs of a backward op in
one launch.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .bn_coefficients import affine_coefficients
from .common import axis_sum, launch


def no_stats(device: torch.device) -> tuple[Tensor, Tensor]:
    """The (mean, var) an op returns when it computed none or wrote them elsewhere: two empty
    tensors (a custom op's outputs may not alias each other; a clone of one would be an op)."""
    return torch.empty(0, dtype=torch.float32, device=device), torch.empty(0, dtype=torch.float32, device=device)


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


@triton.jit(do_not_specialize=["M"])
def _stats_finalize_kernel(p_ptr, mean_ptr, var_ptr, invstd_ptr, scale_ptr, shift_ptr, w_ptr, b_ptr, eps, C, R, M,
                           DERIVED: tl.constexpr, AFFINE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                           HAS_BIAS: tl.constexpr,
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
    var = m2 / total
    tl.store(mean_ptr + offs_c, mean, mask=c_ok)
    if not DERIVED:
        tl.store(var_ptr + offs_c, var, mask=c_ok)
    else:
        # The statistics rows hold the unbiased variance, the one running stats take.
        tl.store(var_ptr + offs_c, m2 / (total - 1.0), mask=c_ok)
        invstd = 1.0 / tl.sqrt_rn(var + eps)  # not the approximate rsqrt.approx
        tl.store(invstd_ptr + offs_c, invstd, mask=c_ok)
        if AFFINE:
            scale, shift = affine_coefficients(mean, invstd, w_ptr, b_ptr, offs_c, c_ok, HAS_WEIGHT, HAS_BIAS)
            tl.store(scale_ptr + offs_c, scale, mask=c_ok)
            tl.store(shift_ptr + offs_c, shift, mask=c_ok)


def finalize_stats(partials: Tensor, m: int, tile_p: int, stats_into: Optional[Tensor] = None,
                   coefs_into: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """Mean and biased variance (float32) over ``m`` rows from (2, C, R) partials of ``tile_p``-row tiles.

    With ``stats_into`` (the op interface's ``StatsOut``: a float32 (3, C) view of contiguous rows)
    they are written there, the variance as the unbiased m / (m - 1) * var, with invstd =
    rsqrt(var + eps) as the third row, and with
    ``coefs_into`` ((2, C)) the BN coefficients scale = weight * invstd, shift = bias - mean *
    scale; the returned mean and (unbiased) var are then views of ``stats_into``.
    """
    _, channels, rows = partials.shape
    if stats_into is None:
        mean = torch.empty(channels, dtype=torch.float32, device=partials.device)
        var = torch.empty_like(mean)
        invstd = var  # a placeholder pointer: nothing writes invstd without stats_into
    else:
        mean, var, invstd = stats_into.unbind()
    scale, shift = (mean, mean) if coefs_into is None else coefs_into.unbind()
    if any(t.stride(0) != 1 and channels > 1 for t in (mean, var, invstd, scale, shift)):
        raise ValueError("finalize_stats writes rows of contiguous per-channel entries")
    # A program reduces BLOCK_C channels' rows BLOCK_T at a time: up to 2048 values per step, and
    # one channel per program when there are few rows per channel and many channels (or the reverse).
    block_t = 1024 if rows > 256 else (256 if rows > 64 else 64)
    block_c = max(1, min(16, 2048 // block_t, triton.next_power_of_2(max(1, channels // 128))))
    launch(_stats_finalize_kernel)[(triton.cdiv(channels, block_c),)](
        partials, mean, var, invstd, scale, shift,
        weight if weight is not None else mean, bias if bias is not None else mean, float(eps),
        channels, rows, m, DERIVED=stats_into is not None, AFFINE=coefs_into is not None,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        TILE_P=tile_p, BLOCK_C=block_c, BLOCK_T=block_t, num_warps=4)
    return mean, var


@triton.jit
def _sum_columns(p_ptr, R, s_r, s_c, offs_c, c_ok, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Column sums, rows in order, of the (R, C) matrix at ``p_ptr`` (strides s_r, s_c)."""
    acc = tl.full([BLOCK_C], 0.0, tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        ok = (offs_r < R)[:, None] & c_ok[None, :]
        acc += axis_sum(tl.load(p_ptr + offs_r[:, None] * s_r + offs_c[None, :] * s_c, mask=ok, other=0.0), 0)
    return acc


@triton.jit
def _add_scaled(acc_ptr, f_ptr, total, offs, ok):
    """acc[offs] += f[offs] * total."""
    f = tl.load(f_ptr + offs, mask=ok, other=0.0)
    tl.store(acc_ptr + offs, tl.load(acc_ptr + offs, mask=ok, other=0.0) + f * total, mask=ok)


# Tiles of the two jobs: tile sums over their contiguous axis (long rows, a few channels per
# program); split sums over their slow axis (a few splits, wide contiguous rows).
_PAIR_R, _PAIR_C = tl.constexpr(256), tl.constexpr(8)
_SPLIT_R, _SPLIT_C = tl.constexpr(8), tl.constexpr(256)


@triton.jit(do_not_specialize=["S", "A", "B", "n_pair_programs"])
def _sum_partials_kernel(pair_ptr, sum_a_ptr, sum_b_ptr, C, R, split_ptr, out_ptr, S, A, B, n_pair_programs,
                         acc_a_ptr, acc_b_ptr, f_a_ptr, f_b_ptr,
                         HAS_PAIRS: tl.constexpr, HAS_SPLITS: tl.constexpr, ACCUMULATE: tl.constexpr):
    pid = tl.program_id(0)
    if HAS_PAIRS and pid < n_pair_programs:
        # (2, C, R) partials -> their two per-channel sums over R
        offs_c = pid * _PAIR_C + tl.arange(0, _PAIR_C)
        c_ok = offs_c < C
        sum_a = _sum_columns(pair_ptr, R, 1, R, offs_c, c_ok, _PAIR_R, _PAIR_C)
        sum_b = _sum_columns(pair_ptr + C * R, R, 1, R, offs_c, c_ok, _PAIR_R, _PAIR_C)
        tl.store(sum_a_ptr + offs_c, sum_a, mask=c_ok)
        tl.store(sum_b_ptr + offs_c, sum_b, mask=c_ok)
        if ACCUMULATE:  # acc_a += f_a * sum_a, acc_b += f_b * sum_b
            _add_scaled(acc_a_ptr, f_a_ptr, sum_a, offs_c, c_ok)
            _add_scaled(acc_b_ptr, f_b_ptr, sum_b, offs_c, c_ok)
    if HAS_SPLITS and pid >= n_pair_programs:
        # (S, A, B) partials -> the (B, A) transpose of their sum over S, in the output's dtype
        offs = (pid - n_pair_programs) * _SPLIT_C + tl.arange(0, _SPLIT_C)
        ok = offs < A * B
        acc = _sum_columns(split_ptr, S, A * B, 1, offs, ok, _SPLIT_R, _SPLIT_C)
        tl.store(out_ptr + (offs % B) * A + offs // B, acc.to(out_ptr.dtype.element_ty), mask=ok)


def sum_partials(pairs: Tensor, splits: Optional[Tensor] = None, dtype: Optional[torch.dtype] = None,
                 accumulate: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None,
                 ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Finishes a backward op's partials in one kernel: the two per-channel float32 sums over R of
    (2, C, R) ``pairs`` and, given (S, A, B) ``splits`` (a weight gradient's float32 split partials),
    the (B, A) transpose of their sum over S in ``dtype``. Sums run in order: deterministic.

    With ``accumulate`` = (acc_a, acc_b, f_a, f_b), contiguous float32 vectors of C entries, it
    also adds ``f_a * sum_a`` into ``acc_a`` and ``f_b * sum_b`` into ``acc_b``."""
    _, channels, rows = pairs.shape
    sum_a = torch.empty(channels, dtype=torch.float32, device=pairs.device)
    sum_b = torch.empty_like(sum_a)
    n_pair = triton.cdiv(channels, _PAIR_C.value)
    if splits is None:
        out, n_split, (s, a, b) = sum_a, 0, (0, 0, 0)
    else:
        s, a, b = splits.shape
        out = torch.empty((b, a), dtype=dtype, device=pairs.device)
        n_split = triton.cdiv(a * b, _SPLIT_C.value)
    if accumulate is not None and any(t.stride(0) != 1 and channels > 1 for t in accumulate):
        raise ValueError("sum_partials accumulates into contiguous per-channel vectors")
    acc = accumulate if accumulate is not None else (sum_a,) * 4
    launch(_sum_partials_kernel)[(n_pair + n_split,)](
        pairs, sum_a, sum_b, channels, rows, splits if splits is not None else pairs, out, s, a, b, n_pair, *acc,
        HAS_PAIRS=True, HAS_SPLITS=splits is not None, ACCUMULATE=accumulate is not None, num_warps=4)
    return sum_a, sum_b, (out if splits is not None else None)
