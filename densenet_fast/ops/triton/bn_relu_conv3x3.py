"""Fused ``conv3x3(relu(z * scale + shift), weight, padding=1) * noise`` written into the buffer.

An implicit GEMM: rows are the batch's pixels, the reduction runs over 9 taps x input channels,
each tap reading the input tile shifted by (dh, dw). BN2-ReLU is applied as a tile is loaded and
the padding is applied after it (zero-padding is in the normalized domain, as in conv2d on the
ReLU's output): each tap accumulates on its own and its rows outside the image are dropped when it
is added to the total (a row mask inside the prologue would serialize Hopper's wgmma, see
common.bn_relu). The epilogue multiplies by dropout's scaled mask, stores the k new channels
straight into their slice of the feature buffer (``out``, any strides that collapse H and W) and
writes the statistics partials of the stored values.

Its tap loop twins the data job's of bn_relu_conv3x3_backward.py (the transposed convolution reads
the taps mirrored, -dh and -dw), kept apart as that file's docstring says.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    PIXEL_BLOCK,
    bn_relu,
    collapsible,
    dot_precision,
    gemm_warps,
    launch,
    pixel_rows,
    pow2_block,
    row_align,
    small_map,
    strides_nchw,
    tile_stats,
)
from .partials import finalize_stats, new_stats_partials, no_stats, store_tile_partials


@triton.jit(do_not_specialize=["M", "n_co_tiles"])
def _conv3x3_fwd_kernel(
    z_ptr, scale_ptr, shift_ptr, w_ptr, noise_ptr, out_ptr, p_ptr,
    C_in, C_out, M, H, W, n_co_tiles,
    s_zn, s_zc, s_zhw, s_wo, s_wi, s_wh, s_ww, s_nn, s_nc, s_nhw, s_on, s_oc, s_ohw,
    HAS_NOISE: tl.constexpr, WITH_STATS: tl.constexpr, PRECISION: tl.constexpr, OUT_ALIGN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0) // n_co_tiles
    offs_co = (tl.program_id(0) % n_co_tiles) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = offs_co < C_out
    HW = H * W
    p_ok, hw, n, z_rows = pixel_rows(pid_m, M, HW, s_zn, s_zhw, BLOCK_P, 1)
    h = hw // W
    w = hw % W
    dot_dtype = w_ptr.dtype.element_ty
    acc = tl.full([BLOCK_P, BLOCK_CO], 0.0, tl.float32)
    for tap in range(9):
        dh = tap // 3 - 1
        dw = tap % 3 - 1
        hh = h + dh
        ww = w + dw
        tap_ok = p_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        pix = z_rows + (dh * W + dw) * s_zhw  # (hh, ww) of the same image
        tap_acc = tl.full([BLOCK_P, BLOCK_CO], 0.0, tl.float32)
        for k0 in range(0, C_in, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < C_in
            scale = tl.load(scale_ptr + offs_k, mask=k_ok, other=0.0)
            shift = tl.load(shift_ptr + offs_k, mask=k_ok, other=0.0)
            x = tl.load(z_ptr + pix[:, None] + offs_k[None, :] * s_zc, mask=tap_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + offs_k[:, None] * s_wi + offs_co[None, :] * s_wo + (dh + 1) * s_wh + (dw + 1) * s_ww,
                         mask=k_ok[:, None] & co_ok[None, :], other=0.0)
            tap_acc = tl.dot(bn_relu(x, scale, shift).to(dot_dtype), wt, tap_acc, input_precision=PRECISION)
        acc += tl.where(tap_ok[:, None], tap_acc, 0.0)  # the padding: relu(shift) rows dropped
    o_ok, _, _, o_rows = pixel_rows(pid_m, M, HW, s_on, s_ohw, BLOCK_P, OUT_ALIGN)
    valid = o_ok[:, None] & co_ok[None, :]
    if HAS_NOISE:
        _, _, _, n_rows = pixel_rows(pid_m, M, HW, s_nn, s_nhw, BLOCK_P, 1)
        noise = tl.load(noise_ptr + n_rows[:, None] + offs_co[None, :] * s_nc, mask=valid, other=0.0)
        acc = acc * noise.to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + o_rows[:, None] + offs_co[None, :] * s_oc, out, mask=valid)
    if WITH_STATS:
        count = tl.minimum(BLOCK_P, M - pid_m * BLOCK_P).to(tl.float32)
        mean, m2 = tile_stats(out.to(tl.float32), valid, count)
        store_tile_partials(p_ptr, C_out, tl.cdiv(M, BLOCK_P), pid_m, offs_co, co_ok, mean, m2)


def bn_relu_conv3x3(z: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, out: Tensor,
                    noise: Optional[Tensor], with_stats: bool, stats_into: Optional[Tensor] = None,
                    coefs_into: Optional[Tensor] = None, bn_weight: Optional[Tensor] = None,
                    bn_bias: Optional[Tensor] = None, eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """Writes the new channels into ``out``; returns their float32 (mean, var), empty without
    ``with_stats`` or when written into ``stats_into`` with what follows (``finalize_stats``)."""
    return _bn_relu_conv3x3_op(z, scale, shift, weight, out, noise, with_stats, stats_into, coefs_into, bn_weight,
                               bn_bias, eps)


# The registered op has no default arguments: torch 2.11's dispatcher drops trailing arguments
# equal to their defaults, and its version bump of mutated arguments then indexes past them.
@torch.library.triton_op("densenet_fast_triton::bn_relu_conv3x3", mutates_args={"out", "stats_into", "coefs_into"})
def _bn_relu_conv3x3_op(z: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, out: Tensor,
                        noise: Optional[Tensor], with_stats: bool, stats_into: Optional[Tensor],
                        coefs_into: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                        eps: float) -> tuple[Tensor, Tensor]:
    n, c_in, h, w = z.shape
    c_out = weight.shape[0]
    m = n * h * w
    z = collapsible(z)
    target = out if collapsible(out) is out else out.contiguous()
    precision = dot_precision(z.dtype)
    block_p = PIXEL_BLOCK
    block_co = pow2_block(c_out, 16, 16 if small_map(h * w) and precision != "ieee" else 64)
    rows, n_co_tiles = triton.cdiv(m, block_p), triton.cdiv(c_out, block_co)
    partials = new_stats_partials(c_out if with_stats else 0, rows, z.device)
    if noise is not None:
        noise = collapsible(noise)
        s_noise = strides_nchw(noise)
    else:
        s_noise = (0, 0, 0)
    launch(_conv3x3_fwd_kernel)[(rows * n_co_tiles,)](
        z, scale, shift, weight, noise if noise is not None else target, target, partials,
        c_in, c_out, m, h, w, n_co_tiles, *strides_nchw(z), *weight.stride(), *s_noise, *strides_nchw(target),
        HAS_NOISE=noise is not None, WITH_STATS=with_stats, PRECISION=precision,
        OUT_ALIGN=min(row_align(target), block_p), BLOCK_P=block_p, BLOCK_CO=block_co, BLOCK_K=32,
        # Two accumulators (the tap's and the total): FMA dots (float32 without TF32) get 8 warps
        # (at 4 they spilled, 64 x 16 tiles included).
        num_warps=8 if precision == "ieee" else gemm_warps(precision, block_p * block_co), num_stages=3)
    if target is not out:
        out.copy_(target)
    if not with_stats or stats_into is not None:
        if with_stats:
            finalize_stats(partials, m, block_p, stats_into, coefs_into, bn_weight, bn_bias, eps)
        return no_stats(z.device)
    return finalize_stats(partials, m, block_p)
