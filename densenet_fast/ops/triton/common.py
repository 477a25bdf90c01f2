"""Pieces shared by the fused Triton kernels: tiling conventions, the BN-ReLU prologue, the
backward epilogue, batch statistics from per-tile partials, and launch helpers.

Tiling. Every kernel walks activations as (image n, tile of BLOCK_P pixels of that image, tile of
channels). A pixel tile never straddles two images, so ``hw = tile_start + arange`` stays a
contiguous range and the address of pixel ``hw`` of channel ``c`` is ``n*s_n + c*s_c + hw*s_hw``:
that holds for NCHW (``s_hw = 1``) and channels_last (``s_hw = C_total``) buffers and their channel
slices alike, because their H and W strides collapse (``s_h == W * s_w``). Triton specializes
integer arguments equal to 1, so the contiguous dimension is known at compile time either way.

Statistics. A kernel that produces a tensor whose batch statistics are needed writes, per pixel
tile and channel, the tile's sum and its sum of squared deviations from the *tile's* mean.
``finalize_stats`` combines them with Chan's parallel formula, so no sum of squares of raw values
is ever formed and large means do not cancel the variance away.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

# Data types the kernels compute on; statistics and accumulations are float32 for all of them.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """Whether kernels decorated now run in Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch(kernel):
    """``kernel`` made traceable by torch.compile; interpreted kernels (CPU tests) run as they are."""
    return torch.library.wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of tl.dot: float32 follows PyTorch's TF32 switch for matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for float16/bfloat16 operands


def gemm_warps(precision: str, acc_elements: int) -> int:
    """Warps of a GEMM kernel whose accumulator tile has ``acc_elements``. float32 without TF32
    ("ieee") has no tensor-core path: its dot runs on FMAs with each thread's share of the
    operands in registers, and at 4 warps a 64x64 tile spills (``ptxas -v``, see
    benchmarks/triton_aot.py --resources), so it gets 8 warps, as do tiles of 128x128 and up."""
    return 8 if precision == "ieee" or acc_elements >= 128 * 128 else 4


def weight_grad_pixel_block(precision: str, block_p: int) -> int:
    """Pixels per step of a weight-gradient GEMM, whose reduction runs over pixels. An FMA dot
    ("ieee") keeps each thread's slice of both operands over the whole step in registers: 16
    pixels keep its 64x64 tile from spilling (64 spilled 10-30 KB per thread on sm_90)."""
    return 16 if precision == "ieee" else block_p


# Programs a weight-gradient GEMM aims for (a few waves on a big GPU): its reduction over pixel
# tiles is split over programs that each write float32 partials, summed afterwards.
_WEIGHT_GRAD_PROGRAMS = 512


def split_pixel_tiles(total_tiles: int, output_tiles: int, max_splits: int) -> tuple[int, int]:
    """(splits, pixel tiles per split) of a weight-gradient GEMM with ``output_tiles`` output tiles
    reducing over ``total_tiles`` pixel tiles: about _WEIGHT_GRAD_PROGRAMS programs, at most
    ``max_splits`` partials (they cost memory), and no split left empty."""
    splits = max(1, min(max_splits, total_tiles, _WEIGHT_GRAD_PROGRAMS // output_tiles))
    per_split = triton.cdiv(total_tiles, splits)
    return triton.cdiv(total_tiles, per_split), per_split


def pow2_block(n: int, lo: int, hi: int) -> int:
    """The power of two covering ``n``, clamped to [lo, hi] (tl.dot needs dimensions >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def pixel_block(hw: int) -> int:
    """Pixels per GEMM tile: one of two sizes, so few kernel variants are compiled (each costs
    seconds, and a DenseNet's maps come in four sizes per precision)."""
    return 32 if hw <= 32 else 64


def hw_stride(t: Tensor) -> Optional[int]:
    """The stride of the flattened H*W index of ``t`` (N, C, H, W), or None if H and W don't collapse."""
    h, w = t.shape[2], t.shape[3]
    if w == 1:
        return t.stride(2)
    if h == 1 or t.stride(2) == w * t.stride(3):
        return t.stride(3)
    return None


def collapsible(t: Tensor) -> Tensor:
    """``t`` itself when its H and W collapse into one index, else a contiguous copy."""
    return t if hw_stride(t) is not None else t.contiguous()


def strides_nchw(t: Tensor) -> tuple[int, int, int]:
    """(s_n, s_c, s_hw) of a collapsible tensor."""
    s_hw = hw_stride(t)
    assert s_hw is not None, "call collapsible() first"
    return t.stride(0), t.stride(1), s_hw


@triton.jit
def _add(a, b):
    return a + b


if interpreting() and isinstance(tl.standard.sum, JITFunction):
    # Triton was imported before TRITON_INTERPRET=1 was set, so its own @jit library functions
    # (tl.sum, tl.zeros; the kernels use tl.full) are compiled-only and fail inside interpreted
    # kernels: sum through tl.reduce and a combine function decorated like our kernels (slower).
    @triton.jit
    def column_sum(v):
        return tl.reduce(v, 0, _add)
else:
    @triton.jit
    def column_sum(v):
        """``tl.sum(v, axis=0)``."""
        return tl.sum(v, axis=0)


@triton.jit
def bn_relu(x, scale, shift, valid):
    """relu(x * scale + shift) in float32, zero where ``valid`` is false (padding, tile overhang)."""
    y = tl.maximum(x.to(tl.float32) * scale[None, :] + shift[None, :], 0.0)
    return tl.where(valid, y, 0.0)


@triton.jit
def pooled_bn_relu(ptrs, s_xh, s_xw, scale, shift, valid, POOL: tl.constexpr):
    """bn_relu of the input tile at ``ptrs``; with ``POOL``, the mean of bn_relu over the 2x2
    window whose top-left inputs ``ptrs`` address (the transition: BN-ReLU, then the average pool)."""
    y = bn_relu(tl.load(ptrs, mask=valid, other=0.0), scale, shift, valid)
    if POOL:
        y += bn_relu(tl.load(ptrs + s_xw, mask=valid, other=0.0), scale, shift, valid)
        y += bn_relu(tl.load(ptrs + s_xh, mask=valid, other=0.0), scale, shift, valid)
        y += bn_relu(tl.load(ptrs + s_xh + s_xw, mask=valid, other=0.0), scale, shift, valid)
        y = y * 0.25
    return y


@triton.jit
def grad_out_tile_t(g_ptr, t, n_hw_tiles, HW, offs_co, co_ok, s_gn, s_gc, s_ghw, BLOCK_P: tl.constexpr):
    """Pixel tile ``t`` (tile ``t % n_hw_tiles`` of image ``t // n_hw_tiles``) of the output
    gradient, transposed for a weight-gradient GEMM: (image, pixel offsets, their mask, the
    BLOCK_CO x BLOCK_P tile)."""
    n = (t // n_hw_tiles).to(tl.int64)
    offs_p = (t % n_hw_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < HW
    gt = tl.load(g_ptr + n * s_gn + offs_co[:, None] * s_gc + offs_p[None, :] * s_ghw,
                 mask=co_ok[:, None] & p_ok[None, :], other=0.0)
    return n, offs_p, p_ok, gt


@triton.jit
def tile_stats(v, valid, first_row, count):
    """Per-column mean and sum of squared deviations from that mean over the ``valid`` rows
    (``first_row`` marks the tile's first row, which is always valid).

    Sums are taken of deviations from the tile's first row, so a large mean costs no precision: the
    mean is accurate to about an ulp of itself, and the variance to float32 of the deviations.
    """
    first = column_sum(tl.where(valid & first_row[:, None], v, 0.0))
    dev = tl.where(valid, v - first[None, :], 0.0)
    mean_dev = column_sum(dev) / count
    centered = tl.where(valid, dev - mean_dev[None, :], 0.0)
    return first + mean_dev, column_sum(centered * centered)


@triton.jit
def dy_epilogue(acc, x, valid, scale, shift, center, gx_ptrs, ACCUMULATE: tl.constexpr):
    """Masks the data gradient ``acc`` by the ReLU recomputed from ``x``, adds ``scale * dy`` into the
    gradient accumulator (or stores it), and returns the tile's sum(dy) and sum(dy * (x - center))."""
    xf = x.to(tl.float32)
    dy = tl.where(valid & (xf * scale[None, :] + shift[None, :] > 0.0), acc, 0.0)
    g = dy * scale[None, :]
    if ACCUMULATE:
        g += tl.load(gx_ptrs, mask=valid, other=0.0).to(tl.float32)
    tl.store(gx_ptrs, g.to(gx_ptrs.dtype.element_ty), mask=valid)
    xc = tl.where(valid, xf - center[None, :], 0.0)
    return column_sum(dy), column_sum(dy * xc)


@triton.jit
def _partial_means(pmean_ptr, t0, T, C, HW, n_hw_tiles, offs_c, c_ok, TILE_P: tl.constexpr, BLOCK_T: tl.constexpr):
    """Partials rows t0 .. t0 + BLOCK_T: (their offsets, mask, pixel count of each tile, tile means)."""
    offs_t = t0 + tl.arange(0, BLOCK_T)
    rows = offs_t[:, None] * C + offs_c[None, :]
    ok = (offs_t < T)[:, None] & c_ok[None, :]
    count = tl.minimum(TILE_P, HW - (offs_t % n_hw_tiles) * TILE_P).to(tl.float32)
    return rows, ok, count, tl.load(pmean_ptr + rows, mask=ok, other=0.0)


@triton.jit
def _stats_finalize_kernel(
    pmean_ptr, pm2_ptr, mean_ptr, var_ptr,
    C, T, HW, n_hw_tiles, total,
    TILE_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    # The mean as the first tile's mean plus the count-weighted deviations of every tile's mean
    # from it: no sum of raw values is ever formed.
    m0 = tl.load(pmean_ptr + offs_c, mask=c_ok, other=0.0)
    acc = tl.full([BLOCK_C], 0.0, tl.float32)
    for t0 in range(0, T, BLOCK_T):
        rows, ok, count, m = _partial_means(pmean_ptr, t0, T, C, HW, n_hw_tiles, offs_c, c_ok, TILE_P, BLOCK_T)
        acc += column_sum(tl.where(ok, count[:, None] * (m - m0[None, :]), 0.0))
    mean = m0 + acc / total
    m2 = tl.full([BLOCK_C], 0.0, tl.float32)
    for t0 in range(0, T, BLOCK_T):
        rows, ok, count, m = _partial_means(pmean_ptr, t0, T, C, HW, n_hw_tiles, offs_c, c_ok, TILE_P, BLOCK_T)
        q = tl.load(pm2_ptr + rows, mask=ok, other=0.0)
        d = m - mean[None, :]
        m2 += column_sum(tl.where(ok, q + count[:, None] * d * d, 0.0))
    tl.store(mean_ptr + offs_c, mean, mask=c_ok)
    tl.store(var_ptr + offs_c, m2 / total, mask=c_ok)


def new_partials(rows: int, channels: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-tile partial buffers (rows x channels, float32); every entry is written by a kernel."""
    return (torch.empty((rows, channels), dtype=torch.float32, device=device),
            torch.empty((rows, channels), dtype=torch.float32, device=device))


def finalize_stats(pmean: Tensor, pm2: Tensor, hw: int, tile_p: int) -> tuple[Tensor, Tensor]:
    """Mean and biased variance (float32) from the partials (tile mean, tile M2) of pixel tiles of
    ``tile_p`` pixels, row ``n * n_hw_tiles + j`` holding tile j of image n."""
    rows, channels = pmean.shape
    n_hw_tiles = triton.cdiv(hw, tile_p)
    mean = torch.empty(channels, dtype=torch.float32, device=pmean.device)
    var = torch.empty_like(mean)
    block_c = pow2_block(channels, 16, 64)
    total = float((rows // n_hw_tiles) * hw)
    launch(_stats_finalize_kernel)[(triton.cdiv(channels, block_c),)](
        pmean, pm2, mean, var, channels, rows, hw, n_hw_tiles, total,
        TILE_P=tile_p, BLOCK_T=32, BLOCK_C=block_c)
    return mean, var


def ref_stats(t: Tensor) -> tuple[Tensor, Tensor]:
    """Reference per-channel mean and biased variance, computed in float64."""
    var, mean = torch.var_mean(t.double(), dim=(0, 2, 3), unbiased=False)
    return mean.float(), var.float()


def ref_bn_relu(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """Reference relu(x * scale + shift) in float64."""
    return torch.relu(x.double() * scale.double()[:, None, None] + shift.double()[:, None, None])
