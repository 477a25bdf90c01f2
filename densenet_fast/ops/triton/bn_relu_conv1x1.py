"""Fused ``conv1x1(relu(x * scale + shift), weight)`` over a channel prefix of the feature buffer.

A GEMM whose rows are the batch's pixels and whose reduction runs over the input channels. BN-ReLU
is applied to each input tile as it is loaded (the prologue, computed in the matrix unit's operand
layout so that the loop is software-pipelined: cp.async loads of later tiles and the wgmma of this
one overlap), so the normalized prefix never exists in memory. The epilogue rounds the tile to the
output dtype, stores it, and writes the tile's statistics partials (see ``partials.py``), which gives
BN2 its batch mean and variance without another pass over the bottleneck.

With ``POOL`` the same kernel computes the transition's ``conv1x1(avg_pool2x2(relu(...)))``: each
row is an output pixel and the prologue averages the four normalized inputs under it (the
transition's file, ``bn_relu_pool_conv1x1.py``, launches it that way).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .bn_coefficients import affine_coefficients
from .common import (
    PIXEL_BLOCK,
    collapsible,
    dot_precision,
    gemm_warps,
    input_rows,
    launch,
    pixel_rows,
    pooled_bn_relu,
    pow2_block,
    row_align,
    small_map,
    strides_nchw,
    tile_stats,
)
from .partials import finalize_stats, new_stats_partials, no_stats, store_tile_partials


@triton.jit
def _input_coefficients(scale_ptr, shift_ptr, mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, offs_k, k_ok,
                        FROM_STATS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The scale and shift of input channels ``offs_k``: loaded, or with FROM_STATS computed from the
    BN's statistics and parameters and written out by the first program (its grid's (0, 0) tile
    reads every input channel once), where backward reads them."""
    if FROM_STATS:
        mean = tl.load(mean_ptr + offs_k, mask=k_ok, other=0.0)
        invstd = tl.load(invstd_ptr + offs_k, mask=k_ok, other=0.0)
        scale, shift = affine_coefficients(mean, invstd, bnw_ptr, bnb_ptr, offs_k, k_ok, HAS_WEIGHT, HAS_BIAS)
        first = tl.program_id(0) == 0
        tl.store(scale_ptr + offs_k, scale, mask=k_ok & first)  # a mask, not a branch, inside the GEMM loop
        tl.store(shift_ptr + offs_k, shift, mask=k_ok & first)
    else:
        scale = tl.load(scale_ptr + offs_k, mask=k_ok, other=0.0)
        shift = tl.load(shift_ptr + offs_k, mask=k_ok, other=0.0)
    return scale, shift


@triton.jit(do_not_specialize=["M", "n_co_tiles"])
def _conv1x1_fwd_kernel(
    x_ptr, scale_ptr, shift_ptr, w_ptr, out_ptr, p_ptr, mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr,
    C_in, C_out, M, HW_out, W_out, n_co_tiles,
    s_xn, s_xc, s_xh, s_xw,  # without POOL, s_xw is the collapsed H*W stride and s_xh is unused
    s_wo, s_wi, s_on, s_oc, s_ohw,
    POOL: tl.constexpr, WITH_STATS: tl.constexpr, PRECISION: tl.constexpr,
    FROM_STATS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ALIGN: tl.constexpr, OUT_ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0) // n_co_tiles
    offs_co = (tl.program_id(0) % n_co_tiles) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = offs_co < C_out
    if POOL:  # rows are output pixels; the image part of their offsets, the window's added below
        p_ok, hw, _, x_img = pixel_rows(pid_m, M, HW_out, s_xn, 0, BLOCK_P, 1)
    else:
        p_ok, hw, _, x_img = pixel_rows(pid_m, M, HW_out, s_xn, s_xw, BLOCK_P, ALIGN)
    x_rows = input_rows(x_img, hw, s_xh, s_xw, W_out, POOL)
    dot_dtype = w_ptr.dtype.element_ty
    acc = tl.full([BLOCK_P, BLOCK_CO], 0.0, tl.float32)
    for k0 in range(0, C_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < C_in
        scale, shift = _input_coefficients(scale_ptr, shift_ptr, mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, offs_k,
                                           k_ok, FROM_STATS, HAS_WEIGHT, HAS_BIAS)
        # Rows past the batch compute relu(shift), unmasked: their outputs are never stored.
        y = pooled_bn_relu(x_ptr + x_rows[:, None] + offs_k[None, :] * s_xc, s_xh, s_xw, scale, shift,
                           p_ok[:, None] & k_ok[None, :], POOL)
        wt = tl.load(w_ptr + offs_k[:, None] * s_wi + offs_co[None, :] * s_wo,
                     mask=k_ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(y.to(dot_dtype), wt, acc, input_precision=PRECISION)
    out = acc.to(out_ptr.dtype.element_ty)
    o_ok, _, _, o_rows = pixel_rows(pid_m, M, HW_out, s_on, s_ohw, BLOCK_P, OUT_ALIGN)
    valid = o_ok[:, None] & co_ok[None, :]
    tl.store(out_ptr + o_rows[:, None] + offs_co[None, :] * s_oc, out, mask=valid)
    if WITH_STATS:
        count = tl.minimum(BLOCK_P, M - pid_m * BLOCK_P).to(tl.float32)
        mean, m2 = tile_stats(out.to(tl.float32), valid, count)
        store_tile_partials(p_ptr, C_out, tl.cdiv(M, BLOCK_P), pid_m, offs_co, co_ok, mean, m2)


def conv1x1_forward(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], weight: Tensor, pool: bool,
                    with_stats: bool, into: Optional[tuple] = None,
                    coefs_from: Optional[tuple] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Launches the kernel; returns (out, mean, var), the statistics empty without ``with_stats``
    or when written ``into`` (``partials.finalize_stats``'s arguments).

    Given ``coefs_from`` = (mean, invstd, bn_weight or None, bn_bias or None, coefs), contiguous
    float32 vectors of C_in entries and a (2, C_in) block of contiguous rows, the kernel computes
    the input's scale and shift from them and writes them into ``coefs`` (``scale``/``shift`` None).
    """
    if coefs_from is not None:
        from_mean, from_invstd, bn_w, bn_b, coefs = coefs_from
        scale, shift = coefs.unbind()
        if any(t.stride(0) != 1 for t in (from_mean, from_invstd, scale, shift) if t.shape[0] > 1):
            raise ValueError("conv1x1_forward reads and writes contiguous per-channel vectors")
        from_args = (from_mean, from_invstd, bn_w if bn_w is not None else from_mean,
                     bn_b if bn_b is not None else from_mean)
    else:
        from_args, bn_w, bn_b = (scale,) * 4, None, None
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    ho, wo = (h // 2, w // 2) if pool else (h, w)
    m = n * ho * wo
    out = torch.empty((n, c_out, ho, wo), dtype=x.dtype, device=x.device)
    if pool:
        s_xn, s_xc, s_xh, s_xw = x.stride()
        align = 1
    else:
        x = collapsible(x)
        s_xn, s_xc, s_xw = strides_nchw(x)
        s_xh = 0
        align = row_align(x)
    precision = dot_precision(x.dtype)
    # (FMA dots keep their tile: split further they spilled, and they have work enough per tile.)
    block_p = PIXEL_BLOCK
    block_co = pow2_block(c_out, 16, 32 if small_map(ho * wo) and precision != "ieee" else 128)
    rows, n_co_tiles = triton.cdiv(m, block_p), triton.cdiv(c_out, block_co)
    partials = new_stats_partials(c_out if with_stats else 0, rows, x.device)
    launch(_conv1x1_fwd_kernel)[(rows * n_co_tiles,)](
        x, scale, shift, weight, out, partials, *from_args,
        c_in, c_out, m, ho * wo, wo, n_co_tiles, s_xn, s_xc, s_xh, s_xw,
        weight.stride(0), weight.stride(1), out.stride(0), out.stride(1), out.stride(3),
        POOL=pool, WITH_STATS=with_stats, PRECISION=precision,
        FROM_STATS=coefs_from is not None, HAS_WEIGHT=bn_w is not None, HAS_BIAS=bn_b is not None,
        ALIGN=min(align, block_p), OUT_ALIGN=min(row_align(out), block_p),
        BLOCK_P=block_p, BLOCK_CO=block_co, BLOCK_K=32, num_warps=gemm_warps(precision, block_p * block_co),
        num_stages=3)
    if not with_stats:
        return out, *no_stats(x.device)
    if into is not None:
        finalize_stats(partials, m, block_p, *into)
        return out, *no_stats(x.device)
    mean, var = finalize_stats(partials, m, block_p)
    return out, mean, var


# The registered op has no default arguments: torch 2.11's dispatcher drops trailing arguments
# equal to their defaults, and its version bump of mutated arguments then indexes past them.
@torch.library.triton_op("densenet_fast_triton::bn_relu_conv1x1",
                         mutates_args={"stats_into", "coefs_into", "in_coefs"})
def _bn_relu_conv1x1_op(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], weight: Tensor, with_stats: bool,
                        stats_into: Optional[Tensor], coefs_into: Optional[Tensor], bn_weight: Optional[Tensor],
                        bn_bias: Optional[Tensor], eps: float, in_mean: Optional[Tensor], in_invstd: Optional[Tensor],
                        in_weight: Optional[Tensor], in_bias: Optional[Tensor],
                        in_coefs: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    into = None if stats_into is None else (stats_into, coefs_into, bn_weight, bn_bias, eps)
    coefs_from = None if in_coefs is None else (in_mean, in_invstd, in_weight, in_bias, in_coefs)
    return conv1x1_forward(x, scale, shift, weight, False, with_stats, into, coefs_from)


def bn_relu_conv1x1(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], weight: Tensor, with_stats: bool,
                    stats_into: Optional[Tensor] = None, coefs_into: Optional[Tensor] = None,
                    bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
                    eps: float = 0.0, coefs_from: Optional[tuple] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(z, mean, var): the bottleneck and, with ``with_stats``, its float32 batch statistics (else
    empty). With ``stats_into`` they go there instead, with what follows (``finalize_stats``).
    With ``coefs_from`` = (mean, invstd, weight, bias, coefs) the input's scale and shift (None)
    are computed in the kernel and written into the (2, C_in) ``coefs``."""
    in_args = (None,) * 5 if coefs_from is None else tuple(coefs_from)
    return _bn_relu_conv1x1_op(x, scale, shift, weight, with_stats, stats_into, coefs_into, bn_weight, bn_bias, eps,
                               *in_args)
