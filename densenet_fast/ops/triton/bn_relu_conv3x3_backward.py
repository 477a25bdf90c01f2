"""Backward of the fused BN2-ReLU-conv3x3: two jobs in one launch (``_conv3x3_bwd_kernel``).

* data: an implicit GEMM per (tile of the batch's pixels, input-channel tile) over 9 taps x output
  channels, reading ``grad_out`` shifted by (-dh, -dw) (the transposed convolution); the epilogue
  recomputes the ReLU mask from the bottleneck ``z``, writes or adds ``scale * dy`` and the per-tile
  partials of ``sum(dy)`` and ``sum(dy * (z - center))``;
* weight: per (input x output channel tile, split of the pixels) the nine GEMMs
  ``shifted relu(z * scale + shift)^T @ grad_out``, one per tap, in one program: each pixel tile of
  ``grad_out`` is read once for all taps (not once per tap program), the normalized tiles are
  recomputed as they are loaded, and the GEMM's rows are input channels (64 of them), so sm_90
  runs it on wgmma (with 32 output-channel rows it compiled to mma.sync). Splits are summed
  afterwards in float32.

``grad_out`` may be a strided slice of the block's gradient buffer (no dropout) or a new tensor.

Its kernels twin bn_relu_conv1x1_backward's in shape (the same two jobs, the same epilogue and
partials), and that is kept on purpose: what the two share without changing their code is in
common.py and partials.py (pixel_rows, dy_epilogue, split_pixel_tiles, the partial sums); the
rest differs in the taps' addressing and tile shapes, and each kernel's registers, matrix units
and spills are guarded on its own (tools/triton_aot.py --resources, tests/test_triton_compile.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    PIXEL_BLOCK,
    bn_relu,
    collapsible,
    dot_precision,
    dy_epilogue,
    launch,
    pixel_rows,
    pow2_block,
    row_align,
    split_pixel_tiles,
    strides_nchw,
    weight_grad_pixel_block,
)
from .partials import new_stats_partials, store_tile_partials, sum_partials

# Most float32 partials of the weight-gradient GEMM (see common.split_pixel_tiles); each is 9x
# larger than a conv1x1's.
_MAX_SPLITS = 32


@triton.jit
def _data_grad(
    pid, g_ptr, w_ptr, z_ptr, scale_ptr, shift_ptr, center_ptr, gx_ptr, p_ptr,
    C_in, C_out, M, H, W, n_ci_tiles,
    s_gn, s_gc, s_ghw, s_wo, s_wi, s_wh, s_ww, s_zn, s_zc, s_zhw, s_gxn, s_gxc, s_gxhw,
    ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr, X_ALIGN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """Program ``pid`` of the data job: grad_x's tile and the tile's partial sums."""
    pid_m = pid // n_ci_tiles
    offs_ci = (pid % n_ci_tiles) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = offs_ci < C_in
    HW = H * W
    p_ok, hw, _, g_rows = pixel_rows(pid_m, M, HW, s_gn, s_ghw, BLOCK_P, 1)
    h = hw // W
    w = hw % W
    dot_dtype = w_ptr.dtype.element_ty
    acc = tl.full([BLOCK_P, BLOCK_CI], 0.0, tl.float32)
    for tap in range(9):
        dh = tap // 3 - 1
        dw = tap % 3 - 1
        hh = h - dh
        ww = w - dw
        tap_ok = p_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        gpix = g_rows - (dh * W + dw) * s_ghw
        for co0 in range(0, C_out, BLOCK_CO):
            offs_co = co0 + tl.arange(0, BLOCK_CO)
            co_ok = offs_co < C_out
            g = tl.load(g_ptr + gpix[:, None] + offs_co[None, :] * s_gc, mask=tap_ok[:, None] & co_ok[None, :],
                        other=0.0)
            wt = tl.load(w_ptr + offs_co[:, None] * s_wo + offs_ci[None, :] * s_wi + (dh + 1) * s_wh + (dw + 1) * s_ww,
                         mask=co_ok[:, None] & ci_ok[None, :], other=0.0)
            acc = tl.dot(g.to(dot_dtype), wt, acc, input_precision=PRECISION)
    scale = tl.load(scale_ptr + offs_ci, mask=ci_ok, other=0.0)
    shift = tl.load(shift_ptr + offs_ci, mask=ci_ok, other=0.0)
    center = tl.load(center_ptr + offs_ci, mask=ci_ok, other=0.0)
    x_ok, _, _, z_rows = pixel_rows(pid_m, M, HW, s_zn, s_zhw, BLOCK_P, X_ALIGN)
    _, _, _, gx_rows = pixel_rows(pid_m, M, HW, s_gxn, s_gxhw, BLOCK_P, X_ALIGN)
    valid = x_ok[:, None] & ci_ok[None, :]
    x = tl.load(z_ptr + z_rows[:, None] + offs_ci[None, :] * s_zc, mask=valid, other=0.0)
    gx_ptrs = gx_ptr + gx_rows[:, None] + offs_ci[None, :] * s_gxc
    sum_dy, sum_dy_xc = dy_epilogue(acc, x, valid, scale, shift, center, gx_ptrs, ACCUMULATE)
    store_tile_partials(p_ptr, C_in, tl.cdiv(M, BLOCK_P), pid_m, offs_ci, ci_ok, sum_dy, sum_dy_xc)


@triton.jit
def _tap_grad(acc, z_ptr, z_rows, h, w, H, W, p_ok, offs_ci, ci_ok, s_zc, s_zhw, scale, shift, g,
              DH: tl.constexpr, DW: tl.constexpr, PRECISION: tl.constexpr):
    """acc + (shifted relu(z * scale + shift))^T @ g for tap (DH, DW); rows outside the image are zero."""
    tap_ok = p_ok & (h + DH >= 0) & (h + DH < H) & (w + DW >= 0) & (w + DW < W)
    x = tl.load(z_ptr + (z_rows + (DH * W + DW) * s_zhw)[:, None] + offs_ci[None, :] * s_zc,
                mask=tap_ok[:, None] & ci_ok[None, :], other=0.0)
    y = tl.where(tap_ok[:, None], bn_relu(x, scale, shift), 0.0)
    return tl.dot(tl.trans(y.to(g.dtype)), g, acc, input_precision=PRECISION)


@triton.jit
def _store_tap(pgw_ptr, acc, offs_ci, offs_co, mask, C_out, TAP: tl.constexpr):
    # Partials laid out (split, C_in, 3 x 3, C_out): the accumulator's own orientation (a transposed
    # store made ptxas serialize the loop's wgmma), transposed when the splits are summed.
    tl.store(pgw_ptr + offs_ci[:, None] * (9 * C_out) + TAP * C_out + offs_co[None, :], acc, mask=mask)


@triton.jit
def _weight_grad(
    pid, g_ptr, z_ptr, scale_ptr, shift_ptr, pgw_ptr,
    C_in, C_out, M, H, W, n_ci_tiles, n_co_tiles, tiles_per_split, total_tiles,
    s_gn, s_gc, s_ghw, s_zn, s_zc, s_zhw,
    PRECISION: tl.constexpr, G_ALIGN: tl.constexpr,
    BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Program ``pid`` of the weight job: one split's nine tap partials of a channel tile pair."""
    tile = pid % (n_ci_tiles * n_co_tiles)
    split = pid // (n_ci_tiles * n_co_tiles)
    offs_ci = (tile % n_ci_tiles) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    offs_co = (tile // n_ci_tiles) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    ci_ok = offs_ci < C_in
    co_ok = offs_co < C_out
    HW = H * W
    scale = tl.load(scale_ptr + offs_ci, mask=ci_ok, other=0.0)
    shift = tl.load(shift_ptr + offs_ci, mask=ci_ok, other=0.0)
    dot_dtype = g_ptr.dtype.element_ty
    # One accumulator per tap (dh, dw), row-major over the 3x3 window.
    a0 = tl.full([BLOCK_CI, BLOCK_CO], 0.0, tl.float32)
    a1, a2, a3, a4, a5, a6, a7, a8 = a0, a0, a0, a0, a0, a0, a0, a0
    t_end = tl.minimum((split + 1) * tiles_per_split, total_tiles)
    for t in range(split * tiles_per_split, t_end):
        p_ok, hw, _, g_rows = pixel_rows(t, M, HW, s_gn, s_ghw, BLOCK_P, G_ALIGN)
        g = tl.load(g_ptr + g_rows[:, None] + offs_co[None, :] * s_gc, mask=p_ok[:, None] & co_ok[None, :],
                    other=0.0).to(dot_dtype)
        _, _, _, z_rows = pixel_rows(t, M, HW, s_zn, s_zhw, BLOCK_P, 1)
        h = hw // W
        w = hw % W
        args = (z_ptr, z_rows, h, w, H, W, p_ok, offs_ci, ci_ok, s_zc, s_zhw, scale, shift, g)
        a0 = _tap_grad(a0, *args, -1, -1, PRECISION)
        a1 = _tap_grad(a1, *args, -1, 0, PRECISION)
        a2 = _tap_grad(a2, *args, -1, 1, PRECISION)
        a3 = _tap_grad(a3, *args, 0, -1, PRECISION)
        a4 = _tap_grad(a4, *args, 0, 0, PRECISION)
        a5 = _tap_grad(a5, *args, 0, 1, PRECISION)
        a6 = _tap_grad(a6, *args, 1, -1, PRECISION)
        a7 = _tap_grad(a7, *args, 1, 0, PRECISION)
        a8 = _tap_grad(a8, *args, 1, 1, PRECISION)
    base = pgw_ptr + split * C_out * C_in * 9
    mask = ci_ok[:, None] & co_ok[None, :]
    _store_tap(base, a0, offs_ci, offs_co, mask, C_out, 0)
    _store_tap(base, a1, offs_ci, offs_co, mask, C_out, 1)
    _store_tap(base, a2, offs_ci, offs_co, mask, C_out, 2)
    _store_tap(base, a3, offs_ci, offs_co, mask, C_out, 3)
    _store_tap(base, a4, offs_ci, offs_co, mask, C_out, 4)
    _store_tap(base, a5, offs_ci, offs_co, mask, C_out, 5)
    _store_tap(base, a6, offs_ci, offs_co, mask, C_out, 6)
    _store_tap(base, a7, offs_ci, offs_co, mask, C_out, 7)
    _store_tap(base, a8, offs_ci, offs_co, mask, C_out, 8)


# One launch for both jobs: programs [0, n_data) run the data job, the rest the weight job (they
# read the same grad_out and z and write disjoint outputs). Both jobs were shaped for 8 warps and
# 3 stages, which the launch shares. The dispatch has the shape of bn_relu_conv1x1_backward's
# (the same two-job pattern over another convolution's arguments): each kernel keeps its own jobs.
@triton.jit(do_not_specialize=["M", "n_data", "n_ci_tiles", "w_ci_tiles", "w_co_tiles", "tiles_per_split",
                               "total_tiles"])
def _conv3x3_bwd_kernel(
    g_ptr, w_ptr, z_ptr, scale_ptr, shift_ptr, center_ptr, gx_ptr, p_ptr, pgw_ptr,
    C_in, C_out, M, H, W, n_data, n_ci_tiles, w_ci_tiles, w_co_tiles, tiles_per_split, total_tiles,
    s_gn, s_gc, s_ghw, s_wo, s_wi, s_wh, s_ww, s_zn, s_zc, s_zhw, s_gxn, s_gxc, s_gxhw,
    ACCUMULATE: tl.constexpr, WEIGHT_GRAD: tl.constexpr, PRECISION: tl.constexpr,
    X_ALIGN: tl.constexpr, G_ALIGN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
    W_BLOCK_CI: tl.constexpr, W_BLOCK_CO: tl.constexpr, W_BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < n_data:
        _data_grad(pid, g_ptr, w_ptr, z_ptr, scale_ptr, shift_ptr, center_ptr, gx_ptr, p_ptr,
                   C_in, C_out, M, H, W, n_ci_tiles,
                   s_gn, s_gc, s_ghw, s_wo, s_wi, s_wh, s_ww, s_zn, s_zc, s_zhw, s_gxn, s_gxc, s_gxhw,
                   ACCUMULATE, PRECISION, X_ALIGN, BLOCK_P, BLOCK_CI, BLOCK_CO)
    elif WEIGHT_GRAD:
        _weight_grad(pid - n_data, g_ptr, z_ptr, scale_ptr, shift_ptr, pgw_ptr,
                     C_in, C_out, M, H, W, w_ci_tiles, w_co_tiles, tiles_per_split, total_tiles,
                     s_gn, s_gc, s_ghw, s_zn, s_zc, s_zhw, PRECISION, G_ALIGN, W_BLOCK_CI, W_BLOCK_CO, W_BLOCK_P)


@torch.library.triton_op("densenet_fast_triton::bn_relu_conv3x3_backward", mutates_args={"grad_x"})
def bn_relu_conv3x3_backward(grad_out: Tensor, z: Tensor, scale: Tensor, shift: Tensor, weight: Tensor,
                             center: Tensor, grad_x: Tensor, accumulate: bool,
                             need_weight_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_weight (float32, contiguous) or empty, sum_dy, sum_dy_xc); ``grad_x`` gets ``scale * dy``
    (added with ``accumulate``) in every element."""
    n, c_in, h, w = z.shape
    c_out = weight.shape[0]
    m = n * h * w
    grad_out, z = collapsible(grad_out), collapsible(z)
    target = grad_x if collapsible(grad_x) is grad_x else grad_x.contiguous()
    precision = dot_precision(z.dtype)
    block_p = PIXEL_BLOCK
    block_ci = pow2_block(c_in, 16, 64)
    rows, n_ci_tiles = triton.cdiv(m, block_p), triton.cdiv(c_in, block_ci)
    partials = new_stats_partials(c_in, rows, z.device)
    # The weight job: nine accumulators of w_block_ci x w_block_co: 64 rows for wgmma; an FMA dot
    # (float32 without TF32) keeps its operands' slices in registers too: 64 x 32 tiles spilled
    # 12 KB, 32 x 32 344 B, 16 x 32 none (sm_90, 8 warps).
    w_block_ci = 16 if precision == "ieee" else 64
    w_block_co = pow2_block(c_out, 16, 32)
    w_block_p = weight_grad_pixel_block(precision)
    total_tiles = triton.cdiv(m, w_block_p)
    w_ci_tiles, w_co_tiles = triton.cdiv(c_in, w_block_ci), triton.cdiv(c_out, w_block_co)
    splits, per_split = split_pixel_tiles(total_tiles, w_ci_tiles * w_co_tiles, _MAX_SPLITS)
    if need_weight_grad:
        pgw = torch.empty((splits, c_in * 9, c_out), dtype=torch.float32, device=z.device)
    else:
        pgw, splits = partials, 0  # a placeholder pointer: no program runs the weight job
    n_data = rows * n_ci_tiles
    launch(_conv3x3_bwd_kernel)[(n_data + w_ci_tiles * w_co_tiles * splits,)](
        grad_out, weight, z, scale, shift, center, target, partials, pgw,
        c_in, c_out, m, h, w, n_data, n_ci_tiles, w_ci_tiles, w_co_tiles, per_split, total_tiles,
        *strides_nchw(grad_out), *weight.stride(), *strides_nchw(z), *strides_nchw(target),
        ACCUMULATE=accumulate, WEIGHT_GRAD=need_weight_grad, PRECISION=precision,
        X_ALIGN=min(row_align(z), row_align(target), block_p), G_ALIGN=min(row_align(grad_out), w_block_p),
        BLOCK_P=block_p, BLOCK_CI=block_ci, BLOCK_CO=pow2_block(c_out, 16, 64),
        W_BLOCK_CI=w_block_ci, W_BLOCK_CO=w_block_co, W_BLOCK_P=w_block_p, num_warps=8, num_stages=3)
    if target is not grad_x:
        grad_x.copy_(target)
    if need_weight_grad:
        sum_dy, sum_dy_xc, grad_weight = sum_partials(partials, pgw, torch.float32)  # the statistics dtype
        return grad_weight.view(weight.shape), sum_dy, sum_dy_xc
    sum_dy, sum_dy_xc, _ = sum_partials(partials)
    return torch.empty(0, dtype=torch.float32, device=z.device), sum_dy, sum_dy_xc
