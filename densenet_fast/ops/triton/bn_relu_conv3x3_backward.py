"""Backward of the fused BN2-ReLU-conv3x3.

* data: an implicit GEMM per (image, pixel tile, input-channel tile) over 9 taps x output
  channels, reading ``grad_out`` shifted by (-dh, -dw) (the transposed convolution); the epilogue
  recomputes the ReLU mask from the bottleneck ``z``, writes or adds ``scale * dy`` and the per-tile
  partials of ``sum(dy)`` and ``sum(dy * (z - center))``;
* weight: per (output x input channel tile, tap, split of the pixels) the GEMM
  ``grad_out^T @ shifted relu(z * scale + shift)``, the normalized tile recomputed as it is loaded,
  splits summed afterwards in float32.

``grad_out`` may be a strided slice of the block's gradient buffer (no dropout) or a new tensor.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .common import (bn_relu, collapsible, dot_precision, dy_epilogue, gemm_warps, grad_out_tile_t, launch,
                     pixel_block, pow2_block, ref_bn_relu, split_pixel_tiles, strides_nchw,
                     weight_grad_pixel_block)

# Most float32 partials of the weight-gradient GEMM (see common.split_pixel_tiles); each is 9x
# larger than a conv1x1's.
_MAX_SPLITS = 32


@triton.jit(do_not_specialize=["C_in", "C_out"])
def _conv3x3_bwd_data_kernel(
    g_ptr, w_ptr, z_ptr, scale_ptr, shift_ptr, center_ptr, gx_ptr, psum_ptr, psum_xc_ptr,
    C_in, C_out, H, W,
    s_gn, s_gc, s_ghw, s_wo, s_wi, s_wh, s_ww, s_zn, s_zc, s_zhw, s_gxn, s_gxc, s_gxhw,
    ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    HW = H * W
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_ci = tl.program_id(2) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    p_ok = offs_p < HW
    ci_ok = offs_ci < C_in
    h = offs_p // W
    w = offs_p % W
    dot_dtype = w_ptr.dtype.element_ty
    acc = tl.full([BLOCK_P, BLOCK_CI], 0.0, tl.float32)
    for tap in range(9):
        dh = tap // 3 - 1
        dw = tap % 3 - 1
        hh = h - dh
        ww = w - dw
        tap_ok = p_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        gpix = (offs_p - dh * W - dw) * s_ghw
        for co0 in range(0, C_out, BLOCK_CO):
            offs_co = co0 + tl.arange(0, BLOCK_CO)
            co_ok = offs_co < C_out
            g = tl.load(g_ptr + n * s_gn + gpix[:, None] + offs_co[None, :] * s_gc,
                        mask=tap_ok[:, None] & co_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + offs_co[:, None] * s_wo + offs_ci[None, :] * s_wi + (dh + 1) * s_wh + (dw + 1) * s_ww,
                         mask=co_ok[:, None] & ci_ok[None, :], other=0.0)
            acc = tl.dot(g.to(dot_dtype), wt, acc, input_precision=PRECISION)
    scale = tl.load(scale_ptr + offs_ci, mask=ci_ok, other=0.0)
    shift = tl.load(shift_ptr + offs_ci, mask=ci_ok, other=0.0)
    center = tl.load(center_ptr + offs_ci, mask=ci_ok, other=0.0)
    valid = p_ok[:, None] & ci_ok[None, :]
    x = tl.load(z_ptr + n * s_zn + offs_p[:, None] * s_zhw + offs_ci[None, :] * s_zc, mask=valid, other=0.0)
    gx_ptrs = gx_ptr + n * s_gxn + offs_p[:, None] * s_gxhw + offs_ci[None, :] * s_gxc
    sum_dy, sum_dy_xc = dy_epilogue(acc, x, valid, scale, shift, center, gx_ptrs, ACCUMULATE)
    row = n * tl.num_programs(0) + pid_p
    tl.store(psum_ptr + row * C_in + offs_ci, sum_dy, mask=ci_ok)
    tl.store(psum_xc_ptr + row * C_in + offs_ci, sum_dy_xc, mask=ci_ok)


@triton.jit(do_not_specialize=["C_in", "C_out", "tiles_per_split", "total_tiles"])
def _conv3x3_bwd_weight_kernel(
    g_ptr, z_ptr, scale_ptr, shift_ptr, pgw_ptr,
    C_in, C_out, H, W, n_hw_tiles, tiles_per_split, total_tiles, n_ci_blocks,
    s_gn, s_gc, s_ghw, s_zn, s_zc, s_zhw,
    PRECISION: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_co = (pid // n_ci_blocks) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_ci = (pid % n_ci_blocks) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    tap = tl.program_id(1)
    split = tl.program_id(2)
    dh = tap // 3 - 1
    dw = tap % 3 - 1
    HW = H * W
    co_ok = offs_co < C_out
    ci_ok = offs_ci < C_in
    scale = tl.load(scale_ptr + offs_ci, mask=ci_ok, other=0.0)
    shift = tl.load(shift_ptr + offs_ci, mask=ci_ok, other=0.0)
    dot_dtype = g_ptr.dtype.element_ty
    acc = tl.full([BLOCK_CO, BLOCK_CI], 0.0, tl.float32)
    t_end = tl.minimum((split + 1) * tiles_per_split, total_tiles)
    for t in range(split * tiles_per_split, t_end):
        n, offs_p, p_ok, gt = grad_out_tile_t(g_ptr, t, n_hw_tiles, HW, offs_co, co_ok, s_gn, s_gc, s_ghw, BLOCK_P)
        hh = offs_p // W + dh
        ww = offs_p % W + dw
        valid = (p_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W))[:, None] & ci_ok[None, :]
        x = tl.load(z_ptr + n * s_zn + ((offs_p + dh * W + dw) * s_zhw)[:, None] + offs_ci[None, :] * s_zc,
                    mask=valid, other=0.0)
        y = bn_relu(x, scale, shift, valid)
        acc = tl.dot(gt.to(dot_dtype), y.to(dot_dtype), acc, input_precision=PRECISION)
    # Partials laid out (split, C_out, C_in, 3, 3) so their sum is the weight gradient's layout.
    tl.store(pgw_ptr + split * C_out * C_in * 9 + offs_co[:, None] * (C_in * 9) + offs_ci[None, :] * 9 + tap, acc,
             mask=co_ok[:, None] & ci_ok[None, :])


@torch.library.triton_op("densenet_fast_triton::bn_relu_conv3x3_backward", mutates_args={"grad_x"})
def bn_relu_conv3x3_backward(grad_out: Tensor, z: Tensor, scale: Tensor, shift: Tensor, weight: Tensor,
                             center: Tensor, grad_x: Tensor, accumulate: bool,
                             need_weight_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_weight or empty, sum_dy, sum_dy_xc); ``grad_x`` gets ``scale * dy`` (added with ``accumulate``)."""
    n, c_in, h, w = z.shape
    c_out = weight.shape[0]
    hw = h * w
    grad_out, z = collapsible(grad_out), collapsible(z)
    target = grad_x if collapsible(grad_x) is grad_x else grad_x.contiguous()
    precision = dot_precision(z.dtype)
    block_p = pixel_block(hw)
    block_ci = pow2_block(c_in, 16, 64)
    grid = (triton.cdiv(hw, block_p), n, triton.cdiv(c_in, block_ci))
    psum = torch.empty((grid[0] * n, c_in), dtype=torch.float32, device=z.device)
    psum_xc = torch.empty_like(psum)
    launch(_conv3x3_bwd_data_kernel)[grid](
        grad_out, weight, z, scale, shift, center, target, psum, psum_xc,
        c_in, c_out, h, w, *strides_nchw(grad_out), *weight.stride(), *strides_nchw(z), *strides_nchw(target),
        ACCUMULATE=accumulate, PRECISION=precision,
        BLOCK_P=block_p, BLOCK_CI=block_ci, BLOCK_CO=pow2_block(c_out, 16, 64), num_warps=4)
    if target is not grad_x:
        grad_x.copy_(target)

    if need_weight_grad:
        block_co = pow2_block(c_out, 16, 64)
        block_p = weight_grad_pixel_block(precision, block_p)
        n_hw_tiles = triton.cdiv(hw, block_p)
        total_tiles = n * n_hw_tiles
        n_ci_blocks = triton.cdiv(c_in, block_ci)
        splits, per_split = split_pixel_tiles(total_tiles, triton.cdiv(c_out, block_co) * n_ci_blocks * 9,
                                              _MAX_SPLITS)
        pgw = torch.empty((splits, c_out, c_in, 3, 3), dtype=torch.float32, device=z.device)
        launch(_conv3x3_bwd_weight_kernel)[(triton.cdiv(c_out, block_co) * n_ci_blocks, 9, splits)](
            grad_out, z, scale, shift, pgw, c_in, c_out, h, w, n_hw_tiles, per_split, total_tiles, n_ci_blocks,
            *strides_nchw(grad_out), *strides_nchw(z), PRECISION=precision,
            BLOCK_CO=block_co, BLOCK_CI=block_ci, BLOCK_P=block_p,
            num_warps=gemm_warps(precision, block_co * block_ci))
        grad_weight = pgw.sum(0).to(weight.dtype)
    else:
        grad_weight = torch.empty(0, dtype=weight.dtype, device=z.device)
    return grad_weight, psum.sum(0), psum_xc.sum(0)


def bn_relu_conv3x3_backward_ref(grad_out: Tensor, z: Tensor, scale: Tensor, shift: Tensor, weight: Tensor,
                                 center: Tensor, grad_x: Optional[Tensor],
                                 need_weight_grad: bool) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """PyTorch reference in float64 through autograd: (new grad_x, grad_weight, sum_dy, sum_dy_xc)."""
    zd = z.double()
    pre = zd * scale.double()[:, None, None] + shift.double()[:, None, None]
    y = ref_bn_relu(z, scale, shift).requires_grad_(True)
    wd = weight.double().requires_grad_(need_weight_grad)
    out = F.conv2d(y, wd, padding=1)
    grads = torch.autograd.grad(out, [y, wd] if need_weight_grad else [y], grad_out.double())
    dy = grads[0] * (pre > 0)
    new_gx = dy * scale.double()[:, None, None]
    if grad_x is not None:
        new_gx = new_gx + grad_x.double()
    sum_dy = dy.sum((0, 2, 3))
    sum_dy_xc = (dy * (zd - center.double()[:, None, None])).sum((0, 2, 3))
    grad_w = grads[1].to(weight.dtype) if need_weight_grad else None
    return new_gx.to(z.dtype), grad_w, sum_dy.float(), sum_dy_xc.float()
