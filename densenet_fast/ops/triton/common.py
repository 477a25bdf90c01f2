"""Pieces shared by the fused Triton kernels: tiling conventions, the BN-ReLU prologue, the
backward epilogue, and launch helpers (``partials.py`` holds the per-tile partial results and the
kernels that finish them).

Tiling. A GEMM's rows are pixels of the whole batch: row ``m`` of ``M = N * H * W`` is pixel
``m % HW`` of image ``m // HW``, so a tile of BLOCK_P rows may span images (as Inductor tiles M over
N*H*W): 7x7 and 14x14 maps waste no masked rows on every image, and a late block has enough tiles to
fill the GPU. The address of pixel ``hw`` of image ``n``, channel ``c`` is ``n*s_n + c*s_c + hw*s_hw``;
that holds for NCHW (``s_hw = 1``) and channels_last (``s_hw = C_total``) buffers and their channel
slices alike, because their H and W strides collapse (``s_h == W * s_w``). When pixels are the
contiguous axis (NCHW), ``row_align`` tells the compiler how many consecutive rows stay in one image
and aligned (``ALIGN``), so their loads vectorize and go through cp.async like a plain matrix's.

Programs. A GEMM's grid is one-dimensional with the output-channel tile fastest: programs that
share a tile of activation rows run side by side, so the rows are read from HBM once and reused in L2.

Specialization. Channel counts and strides are specialized (Triton's divisibility by 16): a mask
``offs_k < C_in`` is then constant over aligned groups of 16 and weight tiles load as vectors
and through cp.async. Tile counts and the batch's row count ``M`` are not (``do_not_specialize``):
they would only multiply the variants to compile.

NaN. The ReLU propagates NaN as torch.relu does (``tl.maximum`` lowers to ``max.f32``, which drops
it), and the backward passes the gradient where the ReLU's output is NaN, as threshold_backward does.
"""
from __future__ import annotations

import contextlib
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


def device_guard(device: torch.device):
    """A context making ``device`` the current CUDA device (nothing for CPU tensors). Triton launches
    on the current device and its current stream, not on the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _GuardedLaunch:
    """``kernel[grid](*args)`` run on the device of its first tensor argument, as the C++ ops'
    CUDAGuard does: a model on cuda:1 launches there whatever the current device is."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        run = self.kernel[grid]

        def guarded(*args, **kwargs):
            device = next(a.device for a in args if isinstance(a, Tensor))
            with device_guard(device):
                return run(*args, **kwargs)
        return guarded


def launch(kernel) -> _GuardedLaunch:
    """``kernel`` made traceable by torch.compile (interpreted kernels, in the CPU tests, run as they
    are), launched on its tensors' device: ``launch(kernel)[grid](*args, **constexprs)``."""
    return _GuardedLaunch(torch.library.wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel)


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of tl.dot: float32 follows PyTorch's TF32 switch for matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for float16/bfloat16 operands


def gemm_warps(precision: str, acc_elements: int) -> int:
    """Warps of a GEMM kernel whose accumulator tile has ``acc_elements``. float32 without TF32
    ("ieee") has no tensor-core path: its dot runs on FMAs with each thread's share of the
    operands in registers, and at 4 warps a 64x64 tile spills (``ptxas -v``, see
    tools/triton_aot.py --resources), so it gets 8 warps, as do tiles of 128x128 and up;
    smaller FMA tiles keep 4 (at 8, ptxas capped a 64x32 tile at 128 registers and spilled)."""
    if precision == "ieee":
        return 8 if acc_elements >= 64 * 64 else 4
    return 8 if acc_elements >= 128 * 128 else 4


def weight_grad_pixel_block(precision: str) -> int:
    """Pixels per step of a weight-gradient GEMM, whose reduction runs over pixels. An FMA dot
    ("ieee") keeps each thread's slice of both operands over the whole step in registers: 16
    pixels keep its 64x64 tile from spilling (64 spilled 10-30 KB per thread on sm_90). On tensor
    cores 32: with 64 per step ptxas serialized the wgmma of the pipelined loop (C7515)."""
    return 16 if precision == "ieee" else 32


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


# Rows (pixels of the batch) per GEMM tile: 64, the row count of Hopper's wgmma (a 32-row tile
# compiles to mma.sync). Tiles span images, so small maps need no smaller tile.
PIXEL_BLOCK = 64


def small_map(hw: int) -> bool:
    """Whether a GEMM over maps of ``hw`` pixels gets narrower output-channel tiles: at 8x8 and below
    (DenseNet-121's block 4 at 7x7, BC's last block at 8x8) a batch of 64 has only ~50-64 tiles of
    64 rows, so each is split over more channel tiles for the grid to cover an H100/H200's 132 SMs.
    A function of the map, not of the batch, so a small batch compiles the same variants."""
    return hw <= 64


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


def row_align(t: Tensor) -> int:
    """ALIGN of a kernel's pixel rows over ``t`` (N, C, H, W, collapsible): when the pixels are the
    contiguous axis, the largest power of two up to 16 that divides both H*W and the image stride,
    so every aligned group of ALIGN rows is contiguous in memory, in one image and inside or outside
    the batch as a whole; 1 when pixels are strided (channels_last, whose channels are contiguous)."""
    hw, s_n = t.shape[2] * t.shape[3], t.stride(0)
    if strides_nchw(t)[2] != 1 or hw == 0:
        return 1
    align = 16
    while hw % align or s_n % align:
        align //= 2
    return align


@triton.jit
def _add(a, b):
    return a + b


if interpreting() and isinstance(tl.standard.sum, JITFunction):
    # Triton was imported before TRITON_INTERPRET=1 was set, so its own @jit library functions
    # (tl.sum, tl.zeros; the kernels use tl.full) are compiled-only and fail inside interpreted
    # kernels: sum through tl.reduce and a combine function decorated like our kernels (slower).
    @triton.jit
    def axis_sum(v, axis: tl.constexpr):
        return tl.reduce(v, axis, _add)
else:
    @triton.jit
    def axis_sum(v, axis: tl.constexpr):
        """``tl.sum(v, axis)``."""
        return tl.sum(v, axis=axis)


@triton.jit
def column_sum(v):
    """``tl.sum(v, axis=0)``."""
    return axis_sum(v, 0)


@triton.jit
def pixel_rows(pid_m, M, HW, s_n, s_hw, BLOCK_P: tl.constexpr, ALIGN: tl.constexpr):
    """Rows ``pid_m * BLOCK_P ...`` of the batch's ``M = N * HW`` pixels: (their mask, pixel index
    within its image, image index, ``n * s_n + hw * s_hw`` as int64). ``ALIGN`` (see row_align)
    divides HW, s_n and BLOCK_P: aligned groups of ALIGN rows are then contiguous and wholly valid
    or not, which the hints tell the compiler so that loads along the rows vectorize."""
    offs_m = pid_m * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = offs_m // ALIGN < M // ALIGN  # offs_m < M, constant over each group of ALIGN rows
    n = offs_m // HW
    hw = offs_m - n * HW
    offsets = n.to(tl.int64) * s_n + hw * s_hw
    if ALIGN > 1:
        offsets = tl.max_contiguous(tl.multiple_of(offsets, ALIGN), ALIGN)
    return ok, hw, n, offsets


@triton.jit
def relu(v):
    """torch.relu: NaN propagates (``tl.maximum`` would drop it on the GPU)."""
    return tl.where(v < 0.0, 0.0, v)


@triton.jit
def relu_passes(v):
    """Where the ReLU passes its gradient, as threshold_backward(dy, relu(v), 0): NaN included."""
    return ~(v <= 0.0)


@triton.jit
def bn_relu(x, scale, shift):
    """relu(x * scale + shift) in float32. Masked-out channels have scale = shift = 0 and give 0;
    rows are not masked here (a row mask stops the compiler from computing the prologue in the
    matrix unit's operand layout, and then wgmma is serialized): a GEMM masks rows in its epilogue,
    or zeroes the other operand there."""
    return relu(x.to(tl.float32) * scale[None, :] + shift[None, :])


@triton.jit
def pooled_bn_relu(ptrs, s_xh, s_xw, scale, shift, mask, POOL: tl.constexpr):
    """bn_relu of the input tile at ``ptrs``; with ``POOL``, the mean of bn_relu over the 2x2
    window whose top-left inputs ``ptrs`` address (the transition: BN-ReLU, then the average pool)."""
    y = bn_relu(tl.load(ptrs, mask=mask, other=0.0), scale, shift)
    if POOL:
        y += bn_relu(tl.load(ptrs + s_xw, mask=mask, other=0.0), scale, shift)
        y += bn_relu(tl.load(ptrs + s_xh, mask=mask, other=0.0), scale, shift)
        y += bn_relu(tl.load(ptrs + s_xh + s_xw, mask=mask, other=0.0), scale, shift)
        y = y * 0.25
    return y


@triton.jit
def input_rows(offsets, hw, s_xh, s_xw, W_out, POOL: tl.constexpr):
    """Offsets of the input pixel under each GEMM row: the row's own pixel, or with POOL the top-left
    input of its 2x2 window (``offsets`` then hold only the image part, ``hw`` the output pixel)."""
    if POOL:
        return offsets + (2 * (hw // W_out)) * s_xh + (2 * (hw % W_out)) * s_xw
    return offsets


@triton.jit
def tile_stats(v, valid, count):
    """Per-column mean and sum of squared deviations from that mean over the ``valid`` rows (the
    tile's first row always is; ``count`` of them).

    Sums are taken of deviations from the tile's first row, so a large mean costs no precision: the
    mean is accurate to about an ulp of itself, and the variance to float32 of the deviations.
    """
    first_row = (tl.arange(0, v.shape[0]) == 0)[:, None]
    first = column_sum(tl.where(valid & first_row, v, 0.0))
    dev = tl.where(valid, v - first[None, :], 0.0)
    mean_dev = column_sum(dev) / count
    centered = tl.where(valid, dev - mean_dev[None, :], 0.0)
    return first + mean_dev, column_sum(centered * centered)


@triton.jit
def dy_epilogue(acc, x, valid, scale, shift, center, gx_ptrs, ACCUMULATE: tl.constexpr):
    """Masks the data gradient ``acc`` by the ReLU recomputed from ``x``, adds ``scale * dy`` into the
    gradient accumulator (or stores it), and returns the tile's sum(dy) and sum(dy * (x - center))."""
    xf = x.to(tl.float32)
    dy = tl.where(valid & relu_passes(xf * scale[None, :] + shift[None, :]), acc, 0.0)
    g = dy * scale[None, :]
    if ACCUMULATE:
        g += tl.load(gx_ptrs, mask=valid, other=0.0).to(tl.float32)
    tl.store(gx_ptrs, g.to(gx_ptrs.dtype.element_ty), mask=valid)
    xc = tl.where(valid, xf - center[None, :], 0.0)
    return column_sum(dy), column_sum(dy * xc)
