"""Backward of the fused BN-ReLU-conv1x1 (and, with ``POOL``, of the transition's BN-ReLU-pool-conv1x1).

Two kernels, neither of which stores the normalized prefix or the masked gradient ``dy``:

* data: per (image, pixel tile, input-channel tile) the GEMM ``grad_out @ weight`` gives the
  gradient of the conv input; the epilogue recomputes the ReLU mask from ``x``, adds
  ``scale * dy`` into the block's gradient buffer and writes per-tile partials of ``sum(dy)`` and
  ``sum(dy * (x - center))`` (summed afterwards, so the result is deterministic);
* weight: per (output-channel tile, input-channel tile, split of the pixels) the GEMM
  ``grad_out^T @ relu(x * scale + shift)`` with the normalized tile recomputed as it is loaded;
  the splits' float32 partials are summed afterwards.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .common import (collapsible, dot_precision, dy_epilogue, gemm_warps, grad_out_tile_t, launch, pixel_block,
                     pooled_bn_relu, pow2_block, ref_bn_relu, split_pixel_tiles, strides_nchw,
                     weight_grad_pixel_block)

# Most float32 partials of the weight-gradient GEMM (see common.split_pixel_tiles).
_MAX_SPLITS = 64


@triton.jit(do_not_specialize=["C_in", "C_out"])
def _conv1x1_bwd_data_kernel(
    g_ptr, w_ptr, x_ptr, scale_ptr, shift_ptr, center_ptr, gx_ptr, psum_ptr, psum_xc_ptr,
    C_in, C_out, HW_out, W_out,
    s_gn, s_gc, s_ghw, s_wo, s_wi,
    s_xn, s_xc, s_xh, s_xw, s_gxn, s_gxc, s_gxh, s_gxw,  # without POOL, the *w strides are the H*W strides
    POOL: tl.constexpr, ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_ci = tl.program_id(2) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    p_ok = offs_p < HW_out
    ci_ok = offs_ci < C_in
    dot_dtype = w_ptr.dtype.element_ty
    acc = tl.full([BLOCK_P, BLOCK_CI], 0.0, tl.float32)
    for co0 in range(0, C_out, BLOCK_CO):
        offs_co = co0 + tl.arange(0, BLOCK_CO)
        co_ok = offs_co < C_out
        g = tl.load(g_ptr + n * s_gn + offs_p[:, None] * s_ghw + offs_co[None, :] * s_gc,
                    mask=p_ok[:, None] & co_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_co[:, None] * s_wo + offs_ci[None, :] * s_wi,
                     mask=co_ok[:, None] & ci_ok[None, :], other=0.0)
        acc = tl.dot(g.to(dot_dtype), wt, acc, input_precision=PRECISION)
    scale = tl.load(scale_ptr + offs_ci, mask=ci_ok, other=0.0)
    shift = tl.load(shift_ptr + offs_ci, mask=ci_ok, other=0.0)
    center = tl.load(center_ptr + offs_ci, mask=ci_ok, other=0.0)
    valid = p_ok[:, None] & ci_ok[None, :]
    if POOL:
        acc = acc * 0.25  # each of the four inputs under an output pixel gets a quarter
        ho = offs_p // W_out
        wo = offs_p % W_out
        sum_dy = tl.full([BLOCK_CI], 0.0, tl.float32)
        sum_dy_xc = tl.full([BLOCK_CI], 0.0, tl.float32)
        for i in tl.static_range(4):
            hh = 2 * ho + i // 2
            ww = 2 * wo + i % 2
            x = tl.load(x_ptr + n * s_xn + (hh * s_xh + ww * s_xw)[:, None] + offs_ci[None, :] * s_xc,
                        mask=valid, other=0.0)
            gx_ptrs = gx_ptr + n * s_gxn + (hh * s_gxh + ww * s_gxw)[:, None] + offs_ci[None, :] * s_gxc
            a, b = dy_epilogue(acc, x, valid, scale, shift, center, gx_ptrs, ACCUMULATE)
            sum_dy += a
            sum_dy_xc += b
    else:
        x = tl.load(x_ptr + n * s_xn + offs_p[:, None] * s_xw + offs_ci[None, :] * s_xc, mask=valid, other=0.0)
        gx_ptrs = gx_ptr + n * s_gxn + offs_p[:, None] * s_gxw + offs_ci[None, :] * s_gxc
        sum_dy, sum_dy_xc = dy_epilogue(acc, x, valid, scale, shift, center, gx_ptrs, ACCUMULATE)
    row = n * tl.num_programs(0) + pid_p
    tl.store(psum_ptr + row * C_in + offs_ci, sum_dy, mask=ci_ok)
    tl.store(psum_xc_ptr + row * C_in + offs_ci, sum_dy_xc, mask=ci_ok)


@triton.jit(do_not_specialize=["C_in", "C_out", "tiles_per_split", "total_tiles"])
def _conv1x1_bwd_weight_kernel(
    g_ptr, x_ptr, scale_ptr, shift_ptr, pgw_ptr,
    C_in, C_out, HW_out, W_out, n_hw_tiles, tiles_per_split, total_tiles,
    s_gn, s_gc, s_ghw, s_xn, s_xc, s_xh, s_xw,
    POOL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr,
):
    offs_co = tl.program_id(0) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_ci = tl.program_id(1) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    split = tl.program_id(2)
    co_ok = offs_co < C_out
    ci_ok = offs_ci < C_in
    scale = tl.load(scale_ptr + offs_ci, mask=ci_ok, other=0.0)
    shift = tl.load(shift_ptr + offs_ci, mask=ci_ok, other=0.0)
    dot_dtype = g_ptr.dtype.element_ty
    acc = tl.full([BLOCK_CO, BLOCK_CI], 0.0, tl.float32)
    t_end = tl.minimum((split + 1) * tiles_per_split, total_tiles)
    for t in range(split * tiles_per_split, t_end):
        n, offs_p, p_ok, gt = grad_out_tile_t(g_ptr, t, n_hw_tiles, HW_out, offs_co, co_ok, s_gn, s_gc, s_ghw, BLOCK_P)
        valid = p_ok[:, None] & ci_ok[None, :]
        if POOL:
            pix = (2 * (offs_p // W_out)) * s_xh + (2 * (offs_p % W_out)) * s_xw
        else:
            pix = offs_p * s_xw
        y = pooled_bn_relu(x_ptr + n * s_xn + pix[:, None] + offs_ci[None, :] * s_xc, s_xh, s_xw, scale, shift,
                           valid, POOL)
        acc = tl.dot(gt.to(dot_dtype), y.to(dot_dtype), acc, input_precision=PRECISION)
    tl.store(pgw_ptr + split * C_out * C_in + offs_co[:, None] * C_in + offs_ci[None, :], acc,
             mask=co_ok[:, None] & ci_ok[None, :])


def conv1x1_backward(grad_out: Tensor, x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, center: Tensor,
                     grad_x: Tensor, accumulate: bool, need_weight_grad: bool,
                     pool: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Launches both kernels; ``grad_x`` receives (or, with ``accumulate``, gains) ``scale * dy``.

    Returns (grad_weight, sum_dy, sum_dy_xc); grad_weight is empty unless requested.
    """
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    ho, wo = grad_out.shape[2], grad_out.shape[3]
    hw_out = ho * wo
    grad_out = collapsible(grad_out)
    s_gn, s_gc, s_ghw = strides_nchw(grad_out)
    target = grad_x
    if pool:
        s_x, s_gx = x.stride(), grad_x.stride()
    else:
        x = collapsible(x)
        if collapsible(grad_x) is not grad_x:
            target = grad_x.contiguous()  # written through a collapsible copy, then copied back
        s_x = (x.stride(0), x.stride(1), 0, strides_nchw(x)[2])
        s_gx = (target.stride(0), target.stride(1), 0, strides_nchw(target)[2])
    precision = dot_precision(x.dtype)
    block_p = pixel_block(hw_out)
    block_ci = pow2_block(c_in, 16, 64)
    grid = (triton.cdiv(hw_out, block_p), n, triton.cdiv(c_in, block_ci))
    psum = torch.empty((grid[0] * n, c_in), dtype=torch.float32, device=x.device)
    psum_xc = torch.empty_like(psum)
    launch(_conv1x1_bwd_data_kernel)[grid](
        grad_out, weight, x, scale, shift, center, target, psum, psum_xc,
        c_in, c_out, hw_out, wo, s_gn, s_gc, s_ghw, weight.stride(0), weight.stride(1), *s_x, *s_gx,
        POOL=pool, ACCUMULATE=accumulate, PRECISION=precision,
        # 8 warps and 32 output channels per step: the epilogue holds tiles of x and grad_x beside
        # the accumulator, and at 4 warps or 64 channels the tile spilled (ptxas -v, sm_90).
        BLOCK_P=block_p, BLOCK_CI=block_ci, BLOCK_CO=pow2_block(c_out, 16, 32), num_warps=8)
    if target is not grad_x:
        grad_x.copy_(target)

    if need_weight_grad:
        block_co = pow2_block(c_out, 16, 64)
        block_p = weight_grad_pixel_block(precision, block_p)
        n_hw_tiles = triton.cdiv(hw_out, block_p)
        total_tiles = n * n_hw_tiles
        splits, per_split = split_pixel_tiles(
            total_tiles, triton.cdiv(c_out, block_co) * triton.cdiv(c_in, block_ci), _MAX_SPLITS)
        pgw = torch.empty((splits, c_out, c_in), dtype=torch.float32, device=x.device)
        launch(_conv1x1_bwd_weight_kernel)[(triton.cdiv(c_out, block_co), triton.cdiv(c_in, block_ci), splits)](
            grad_out, x, scale, shift, pgw, c_in, c_out, hw_out, wo, n_hw_tiles, per_split, total_tiles,
            s_gn, s_gc, s_ghw, *s_x, POOL=pool, PRECISION=precision,
            BLOCK_CO=block_co, BLOCK_CI=block_ci, BLOCK_P=block_p,
            # The pooled prologue holds four input tiles: at 4 warps bf16 spilled 2 KB (Triton 3.6).
            num_warps=8 if pool else gemm_warps(precision, block_co * block_ci))
        grad_weight = pgw.sum(0).to(weight.dtype).view(weight.shape)
    else:
        grad_weight = torch.empty(0, dtype=weight.dtype, device=x.device)
    return grad_weight, psum.sum(0), psum_xc.sum(0)


@torch.library.triton_op("densenet_fast_triton::bn_relu_conv1x1_backward", mutates_args={"grad_x"})
def bn_relu_conv1x1_backward(grad_out: Tensor, x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor,
                             center: Tensor, grad_x: Tensor, accumulate: bool,
                             need_weight_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_weight or empty, sum_dy, sum_dy_xc); ``grad_x`` gets ``scale * dy`` (added with ``accumulate``)."""
    return conv1x1_backward(grad_out, x, scale, shift, weight, center, grad_x, accumulate, need_weight_grad, False)


def conv1x1_backward_ref(grad_out: Tensor, x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, center: Tensor,
                         grad_x: Optional[Tensor], need_weight_grad: bool,
                         pool: bool) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """Reference in float64 through autograd: (new grad_x, grad_weight, sum_dy, sum_dy_xc).

    ``grad_x`` is the accumulator's value before the call (None: no accumulation); it is not modified.
    """
    xd = x.double()
    pre = xd * scale.double()[:, None, None] + shift.double()[:, None, None]
    y = ref_bn_relu(x, scale, shift).requires_grad_(True)
    wd = weight.double().requires_grad_(need_weight_grad)
    out = F.conv2d(F.avg_pool2d(y, 2) if pool else y, wd)
    grads = torch.autograd.grad(out, [y, wd] if need_weight_grad else [y], grad_out.double())
    dy = grads[0] * (pre > 0)
    new_gx = dy * scale.double()[:, None, None]
    if grad_x is not None:
        new_gx = new_gx + grad_x.double()
    sum_dy = dy.sum((0, 2, 3))
    sum_dy_xc = (dy * (xd - center.double()[:, None, None])).sum((0, 2, 3))
    grad_w = grads[1].to(weight.dtype) if need_weight_grad else None
    return new_gx.to(x.dtype), grad_w, sum_dy.float(), sum_dy_xc.float()


def bn_relu_conv1x1_backward_ref(grad_out, x, scale, shift, weight, center, grad_x, need_weight_grad):
    """PyTorch reference of :func:`bn_relu_conv1x1_backward`: (new grad_x, grad_weight, sum_dy, sum_dy_xc)."""
    return conv1x1_backward_ref(grad_out, x, scale, shift, weight, center, grad_x, need_weight_grad, False)
