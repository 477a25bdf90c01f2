"""Fused ``conv1x1(relu(x * scale + shift), weight)`` over a channel prefix of the feature buffer.

A GEMM whose rows are one image's pixels and whose reduction runs over the input channels. BN-ReLU
is applied to each input tile as it is loaded (the prologue), so the normalized prefix never
exists in memory. The epilogue rounds the tile to the output dtype, stores it, and writes the
tile's statistics partials (see ``common.py``), which gives BN2 its batch mean and variance
without another pass over the bottleneck.

With ``POOL`` the same kernel computes the transition's ``conv1x1(avg_pool2x2(relu(...)))``: each
row is an output pixel and the prologue averages the four normalized inputs under it (the
transition's file, ``bn_relu_pool_conv1x1.py``, launches it that way).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .common import (collapsible, dot_precision, finalize_stats, gemm_warps, launch, new_partials, pixel_block,
                     pooled_bn_relu, pow2_block, ref_bn_relu, ref_stats, strides_nchw, tile_stats)


@triton.jit(do_not_specialize=["C_in", "C_out"])
def _conv1x1_fwd_kernel(
    x_ptr, scale_ptr, shift_ptr, w_ptr, out_ptr, pmean_ptr, pm2_ptr,
    C_in, C_out, HW_out, W_out,
    s_xn, s_xc, s_xh, s_xw,  # without POOL, s_xw is the collapsed H*W stride and s_xh is unused
    s_wo, s_wi, s_on, s_oc, s_ohw,
    POOL: tl.constexpr, WITH_STATS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_p = tl.program_id(0)
    n = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_co = tl.program_id(2) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    p_ok = offs_p < HW_out
    co_ok = offs_co < C_out
    if POOL:
        pix = (2 * (offs_p // W_out)) * s_xh + (2 * (offs_p % W_out)) * s_xw
    else:
        pix = offs_p * s_xw
    x_base = x_ptr + n.to(tl.int64) * s_xn
    dot_dtype = w_ptr.dtype.element_ty
    acc = tl.full([BLOCK_P, BLOCK_CO], 0.0, tl.float32)
    for k0 in range(0, C_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < C_in
        scale = tl.load(scale_ptr + offs_k, mask=k_ok, other=0.0)
        shift = tl.load(shift_ptr + offs_k, mask=k_ok, other=0.0)
        valid = p_ok[:, None] & k_ok[None, :]
        y = pooled_bn_relu(x_base + pix[:, None] + offs_k[None, :] * s_xc, s_xh, s_xw, scale, shift, valid, POOL)
        wt = tl.load(w_ptr + offs_k[:, None] * s_wi + offs_co[None, :] * s_wo,
                     mask=k_ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(y.to(dot_dtype), wt, acc, input_precision=PRECISION)
    out = acc.to(out_ptr.dtype.element_ty)
    valid = p_ok[:, None] & co_ok[None, :]
    tl.store(out_ptr + n.to(tl.int64) * s_on + offs_p[:, None] * s_ohw + offs_co[None, :] * s_oc, out, mask=valid)
    if WITH_STATS:
        count = tl.minimum(BLOCK_P, HW_out - pid_p * BLOCK_P).to(tl.float32)
        mean, m2 = tile_stats(out.to(tl.float32), valid, tl.arange(0, BLOCK_P) == 0, count)
        row = n * tl.num_programs(0) + pid_p
        tl.store(pmean_ptr + row * C_out + offs_co, mean, mask=co_ok)
        tl.store(pm2_ptr + row * C_out + offs_co, m2, mask=co_ok)


def conv1x1_forward(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, pool: bool,
                    with_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Launches the kernel; returns (out, mean, var), the statistics empty without ``with_stats``."""
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    ho, wo = (h // 2, w // 2) if pool else (h, w)
    out = torch.empty((n, c_out, ho, wo), dtype=x.dtype, device=x.device)
    if pool:
        s_xn, s_xc, s_xh, s_xw = x.stride()
    else:
        x = collapsible(x)
        s_xn, s_xc, s_xw = strides_nchw(x)
        s_xh = 0
    block_p, block_co = pixel_block(ho * wo), pow2_block(c_out, 16, 128)
    precision = dot_precision(x.dtype)
    grid = (triton.cdiv(ho * wo, block_p), n, triton.cdiv(c_out, block_co))
    rows = grid[0] * n if with_stats else 0
    pmean, pm2 = new_partials(rows, c_out, x.device)
    launch(_conv1x1_fwd_kernel)[grid](
        x, scale, shift, weight, out, pmean, pm2,
        c_in, c_out, ho * wo, wo, s_xn, s_xc, s_xh, s_xw,
        weight.stride(0), weight.stride(1), out.stride(0), out.stride(1), out.stride(3),
        POOL=pool, WITH_STATS=with_stats, PRECISION=precision,
        BLOCK_P=block_p, BLOCK_CO=block_co, BLOCK_K=32, num_warps=gemm_warps(precision, block_p * block_co))
    if not with_stats:
        empty = torch.empty(0, dtype=torch.float32, device=x.device)
        return out, empty, empty.clone()
    mean, var = finalize_stats(pmean, pm2, ho * wo, block_p)
    return out, mean, var


@torch.library.triton_op("densenet_fast_triton::bn_relu_conv1x1", mutates_args=())
def bn_relu_conv1x1(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor,
                    with_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(z, mean, var): the bottleneck and, with ``with_stats``, its float32 batch statistics (else empty)."""
    return conv1x1_forward(x, scale, shift, weight, False, with_stats)


def bn_relu_conv1x1_ref(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor,
                        with_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    """PyTorch reference of :func:`bn_relu_conv1x1` (float64 math, outputs rounded like the kernel's)."""
    z = F.conv2d(ref_bn_relu(x, scale, shift), weight.double()).to(x.dtype)
    if not with_stats:
        empty = torch.empty(0, dtype=torch.float32, device=x.device)
        return z, empty, empty.clone()
    return (z, *ref_stats(z))
