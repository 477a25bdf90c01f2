"""Fused ``conv3x3(relu(z * scale + shift), weight, padding=1) * noise`` written into the buffer.

An implicit GEMM: rows are one image's pixels, the reduction runs over 9 taps x input channels,
each tap reading the input tile shifted by (dh, dw). BN2-ReLU is applied as a tile is loaded and
the padding is applied after it (zero-padding is in the normalized domain, as in conv2d on the
ReLU's output). The epilogue multiplies by dropout's scaled mask, stores the k new channels
straight into their slice of the feature buffer (``out``, any strides that collapse H and W) and
writes the statistics partials of the stored values.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .common import (bn_relu, collapsible, dot_precision, finalize_stats, launch, new_partials, pixel_block,
                     pow2_block, ref_bn_relu, ref_stats, strides_nchw, tile_stats)


@triton.jit(do_not_specialize=["C_in", "C_out"])
def _conv3x3_fwd_kernel(
    z_ptr, scale_ptr, shift_ptr, w_ptr, noise_ptr, out_ptr, pmean_ptr, pm2_ptr,
    C_in, C_out, H, W,
    s_zn, s_zc, s_zhw, s_wo, s_wi, s_wh, s_ww, s_nn, s_nc, s_nhw, s_on, s_oc, s_ohw,
    HAS_NOISE: tl.constexpr, WITH_STATS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    HW = H * W
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_co = tl.program_id(2) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    p_ok = offs_p < HW
    co_ok = offs_co < C_out
    h = offs_p // W
    w = offs_p % W
    z_base = z_ptr + n * s_zn
    dot_dtype = w_ptr.dtype.element_ty
    acc = tl.full([BLOCK_P, BLOCK_CO], 0.0, tl.float32)
    for tap in range(9):
        dh = tap // 3 - 1
        dw = tap % 3 - 1
        hh = h + dh
        ww = w + dw
        tap_ok = p_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        pix = (offs_p + dh * W + dw) * s_zhw  # collapsed H*W index of (hh, ww)
        for k0 in range(0, C_in, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < C_in
            scale = tl.load(scale_ptr + offs_k, mask=k_ok, other=0.0)
            shift = tl.load(shift_ptr + offs_k, mask=k_ok, other=0.0)
            valid = tap_ok[:, None] & k_ok[None, :]
            x = tl.load(z_base + pix[:, None] + offs_k[None, :] * s_zc, mask=valid, other=0.0)
            y = bn_relu(x, scale, shift, valid)
            wt = tl.load(w_ptr + offs_k[:, None] * s_wi + offs_co[None, :] * s_wo + (dh + 1) * s_wh + (dw + 1) * s_ww,
                         mask=k_ok[:, None] & co_ok[None, :], other=0.0)
            acc = tl.dot(y.to(dot_dtype), wt, acc, input_precision=PRECISION)
    valid = p_ok[:, None] & co_ok[None, :]
    if HAS_NOISE:
        noise = tl.load(noise_ptr + n * s_nn + offs_p[:, None] * s_nhw + offs_co[None, :] * s_nc, mask=valid, other=0.0)
        acc = acc * noise.to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + n * s_on + offs_p[:, None] * s_ohw + offs_co[None, :] * s_oc, out, mask=valid)
    if WITH_STATS:
        count = tl.minimum(BLOCK_P, HW - pid_p * BLOCK_P).to(tl.float32)
        mean, m2 = tile_stats(out.to(tl.float32), valid, tl.arange(0, BLOCK_P) == 0, count)
        row = n * tl.num_programs(0) + pid_p
        tl.store(pmean_ptr + row * C_out + offs_co, mean, mask=co_ok)
        tl.store(pm2_ptr + row * C_out + offs_co, m2, mask=co_ok)


@torch.library.triton_op("densenet_fast_triton::bn_relu_conv3x3", mutates_args={"out"})
def bn_relu_conv3x3(z: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, out: Tensor,
                    noise: Optional[Tensor], with_stats: bool) -> tuple[Tensor, Tensor]:
    """Writes the new channels into ``out``; returns their float32 (mean, var), empty without ``with_stats``."""
    n, c_in, h, w = z.shape
    c_out = weight.shape[0]
    z = collapsible(z)
    target = out if collapsible(out) is out else out.contiguous()
    block_p, block_co = pixel_block(h * w), pow2_block(c_out, 16, 64)
    grid = (triton.cdiv(h * w, block_p), n, triton.cdiv(c_out, block_co))
    pmean, pm2 = new_partials(grid[0] * n if with_stats else 0, c_out, z.device)
    if noise is not None:
        noise = collapsible(noise)
        s_noise = strides_nchw(noise)
    else:
        s_noise = (0, 0, 0)
    launch(_conv3x3_fwd_kernel)[grid](
        z, scale, shift, weight, noise if noise is not None else target, target, pmean, pm2,
        c_in, c_out, h, w, *strides_nchw(z), *weight.stride(), *s_noise, *strides_nchw(target),
        HAS_NOISE=noise is not None, WITH_STATS=with_stats, PRECISION=dot_precision(z.dtype),
        BLOCK_P=block_p, BLOCK_CO=block_co, BLOCK_K=32, num_warps=4)
    if target is not out:
        out.copy_(target)
    if not with_stats:
        empty = torch.empty(0, dtype=torch.float32, device=z.device)
        return empty, empty.clone()
    return finalize_stats(pmean, pm2, h * w, block_p)


def bn_relu_conv3x3_ref(z: Tensor, scale: Tensor, shift: Tensor, weight: Tensor,
                        noise: Optional[Tensor], with_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    """PyTorch reference of :func:`bn_relu_conv3x3` (float64 math): (new channels, mean, var)."""
    f = F.conv2d(ref_bn_relu(z, scale, shift), weight.double(), padding=1)
    if noise is not None:
        f = f * noise.double()
    f = f.to(z.dtype)
    if not with_stats:
        empty = torch.empty(0, dtype=torch.float32, device=z.device)
        return f, empty, empty.clone()
    return (f, *ref_stats(f))
