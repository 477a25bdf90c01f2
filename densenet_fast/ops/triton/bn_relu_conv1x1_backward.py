"""Backward of the fused BN-ReLU-conv1x1 (and, with ``POOL``, of the transition's BN-ReLU-pool-conv1x1).

Two jobs in one launch (``_conv1x1_bwd_kernel``), neither of which stores the normalized prefix or
the masked gradient ``dy``:

* data: per (tile of the batch's pixels, input-channel tile) the GEMM ``grad_out @ weight`` gives
  the gradient of the conv input; the epilogue recomputes the ReLU mask from ``x``, adds
  ``scale * dy`` into the block's gradient buffer and writes per-tile partials of ``sum(dy)`` and
  ``sum(dy * (x - center))`` (summed afterwards in order, so the result is deterministic). The
  input-channel tile is the grid's fastest axis: the programs reading one tile of the (large)
  output gradient run together and find it in L2, instead of re-reading it from HBM per channel tile;
* weight: per (input-channel tile, output-channel tile, split of the pixels) the GEMM
  ``relu(x * scale + shift)^T @ grad_out`` (the transposed weight gradient: its rows are input
  channels, at least 64 of them, so sm_90 runs it on wgmma with the recomputed operand in registers
  and ``grad_out`` software-pipelined through shared memory); the splits' float32 partials are
  summed afterwards.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    PIXEL_BLOCK,
    collapsible,
    dot_precision,
    dy_epilogue,
    input_rows,
    launch,
    pixel_rows,
    pooled_bn_relu,
    pow2_block,
    row_align,
    split_pixel_tiles,
    strides_nchw,
    weight_grad_pixel_block,
)
from .partials import new_stats_partials, store_tile_partials, sum_partials

# Most float32 partials of the weight-gradient GEMM (see common.split_pixel_tiles).
_MAX_SPLITS = 64


@triton.jit
def _data_grad(
    pid, g_ptr, w_ptr, x_ptr, scale_ptr, shift_ptr, center_ptr, gx_ptr, p_ptr,
    C_in, C_out, M, HW_out, W_out, n_ci_tiles,
    s_gn, s_gc, s_ghw, s_wo, s_wi,
    s_xn, s_xc, s_xh, s_xw, s_gxn, s_gxc, s_gxh, s_gxw,  # without POOL, the *w strides are the H*W strides
    POOL: tl.constexpr, ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr,
    G_ALIGN: tl.constexpr, X_ALIGN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """Program ``pid`` of the data job: grad_x's tile and the tile's partial sums."""
    pid_m = pid // n_ci_tiles
    offs_ci = (pid % n_ci_tiles) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = offs_ci < C_in
    p_ok, hw, _, g_rows = pixel_rows(pid_m, M, HW_out, s_gn, s_ghw, BLOCK_P, G_ALIGN)
    dot_dtype = w_ptr.dtype.element_ty
    acc = tl.full([BLOCK_P, BLOCK_CI], 0.0, tl.float32)
    for co0 in range(0, C_out, BLOCK_CO):
        offs_co = co0 + tl.arange(0, BLOCK_CO)
        co_ok = offs_co < C_out
        g = tl.load(g_ptr + g_rows[:, None] + offs_co[None, :] * s_gc, mask=p_ok[:, None] & co_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_co[:, None] * s_wo + offs_ci[None, :] * s_wi,
                     mask=co_ok[:, None] & ci_ok[None, :], other=0.0)
        acc = tl.dot(g.to(dot_dtype), wt, acc, input_precision=PRECISION)
    scale = tl.load(scale_ptr + offs_ci, mask=ci_ok, other=0.0)
    shift = tl.load(shift_ptr + offs_ci, mask=ci_ok, other=0.0)
    center = tl.load(center_ptr + offs_ci, mask=ci_ok, other=0.0)
    if POOL:
        acc = acc * 0.25  # each of the four inputs under an output pixel gets a quarter
        valid = p_ok[:, None] & ci_ok[None, :]
        _, _, _, x_img = pixel_rows(pid_m, M, HW_out, s_xn, 0, BLOCK_P, 1)
        _, _, _, gx_img = pixel_rows(pid_m, M, HW_out, s_gxn, 0, BLOCK_P, 1)
        x_rows = input_rows(x_img, hw, s_xh, s_xw, W_out, POOL)
        gx_rows = input_rows(gx_img, hw, s_gxh, s_gxw, W_out, POOL)
        sum_dy = tl.full([BLOCK_CI], 0.0, tl.float32)
        sum_dy_xc = tl.full([BLOCK_CI], 0.0, tl.float32)
        for i in tl.static_range(4):
            x = tl.load(x_ptr + (x_rows + (i // 2) * s_xh + (i % 2) * s_xw)[:, None] + offs_ci[None, :] * s_xc,
                        mask=valid, other=0.0)
            gx_ptrs = gx_ptr + (gx_rows + (i // 2) * s_gxh + (i % 2) * s_gxw)[:, None] + offs_ci[None, :] * s_gxc
            a, b = dy_epilogue(acc, x, valid, scale, shift, center, gx_ptrs, ACCUMULATE)
            sum_dy += a
            sum_dy_xc += b
    else:
        x_ok, _, _, x_rows = pixel_rows(pid_m, M, HW_out, s_xn, s_xw, BLOCK_P, X_ALIGN)
        _, _, _, gx_rows = pixel_rows(pid_m, M, HW_out, s_gxn, s_gxw, BLOCK_P, X_ALIGN)
        valid = x_ok[:, None] & ci_ok[None, :]
        x = tl.load(x_ptr + x_rows[:, None] + offs_ci[None, :] * s_xc, mask=valid, other=0.0)
        gx_ptrs = gx_ptr + gx_rows[:, None] + offs_ci[None, :] * s_gxc
        sum_dy, sum_dy_xc = dy_epilogue(acc, x, valid, scale, shift, center, gx_ptrs, ACCUMULATE)
    store_tile_partials(p_ptr, C_in, tl.cdiv(M, BLOCK_P), pid_m, offs_ci, ci_ok, sum_dy, sum_dy_xc)


@triton.jit
def _weight_grad(
    pid, g_ptr, x_ptr, scale_ptr, shift_ptr, pgw_ptr,
    C_in, C_out, M, HW_out, W_out, n_ci_tiles, n_co_tiles, tiles_per_split, total_tiles,
    s_gn, s_gc, s_ghw, s_xn, s_xc, s_xh, s_xw,
    POOL: tl.constexpr, PRECISION: tl.constexpr, G_ALIGN: tl.constexpr, X_ALIGN: tl.constexpr,
    BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Program ``pid`` of the weight job: one split's partial of a channel tile pair."""
    tile = pid % (n_ci_tiles * n_co_tiles)
    split = pid // (n_ci_tiles * n_co_tiles)
    offs_ci = (tile % n_ci_tiles) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    offs_co = (tile // n_ci_tiles) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    ci_ok = offs_ci < C_in
    co_ok = offs_co < C_out
    scale = tl.load(scale_ptr + offs_ci, mask=ci_ok, other=0.0)
    shift = tl.load(shift_ptr + offs_ci, mask=ci_ok, other=0.0)
    dot_dtype = g_ptr.dtype.element_ty
    acc = tl.full([BLOCK_CI, BLOCK_CO], 0.0, tl.float32)
    t_end = tl.minimum((split + 1) * tiles_per_split, total_tiles)
    for t in range(split * tiles_per_split, t_end):
        p_ok, hw, _, g_rows = pixel_rows(t, M, HW_out, s_gn, s_ghw, BLOCK_P, G_ALIGN)
        # Pixels past the batch load a zero gradient: their (finite) relu(shift) rows add nothing.
        g = tl.load(g_ptr + g_rows[:, None] + offs_co[None, :] * s_gc, mask=p_ok[:, None] & co_ok[None, :],
                    other=0.0)
        if POOL:
            _, _, _, x_img = pixel_rows(t, M, HW_out, s_xn, 0, BLOCK_P, 1)
        else:
            _, _, _, x_img = pixel_rows(t, M, HW_out, s_xn, s_xw, BLOCK_P, X_ALIGN)
        x_rows = input_rows(x_img, hw, s_xh, s_xw, W_out, POOL)
        y = pooled_bn_relu(x_ptr + x_rows[:, None] + offs_ci[None, :] * s_xc, s_xh, s_xw, scale, shift,
                           p_ok[:, None] & ci_ok[None, :], POOL)
        acc = tl.dot(tl.trans(y.to(dot_dtype)), g.to(dot_dtype), acc, input_precision=PRECISION)
    # Partials (split, C_in, C_out): the accumulator's own orientation. (Stored transposed, the
    # epilogue's layout change made ptxas serialize the loop's wgmma: C7515.)
    tl.store(pgw_ptr + split * C_in * C_out + offs_ci[:, None] * C_out + offs_co[None, :], acc,
             mask=ci_ok[:, None] & co_ok[None, :])


# One launch for both jobs: programs [0, n_data) run the data job, the rest the weight job (they
# read the same grad_out and x and write disjoint outputs), at 8 warps and 3 stages. The data job
# needs the 8 warps (its epilogue holds tiles of x and grad_x beside the accumulator: at 4 warps or
# 64 output channels per step the tile spilled, ptxas -v, sm_90); so did the weight job's pooled
# prologue (four input tiles: at 4 warps bf16 spilled 2 KB, Triton 3.6) and its tensor-core tiles
# narrower than 128 output channels (at 4, ptxas serialized the pipelined wgmma of a 64 x 64 tile,
# C7515); float32 without TF32 ran 64 x 128 FMA tiles at 8 (see common.gemm_warps).
@triton.jit(do_not_specialize=["M", "n_data", "n_ci_tiles", "w_ci_tiles", "w_co_tiles", "tiles_per_split",
                               "total_tiles"])
def _conv1x1_bwd_kernel(
    g_ptr, w_ptr, x_ptr, scale_ptr, shift_ptr, center_ptr, gx_ptr, p_ptr, pgw_ptr,
    C_in, C_out, M, HW_out, W_out, n_data, n_ci_tiles, w_ci_tiles, w_co_tiles, tiles_per_split, total_tiles,
    s_gn, s_gc, s_ghw, s_wo, s_wi,
    s_xn, s_xc, s_xh, s_xw, s_gxn, s_gxc, s_gxh, s_gxw,  # without POOL, the *w strides are the H*W strides
    POOL: tl.constexpr, ACCUMULATE: tl.constexpr, WEIGHT_GRAD: tl.constexpr, PRECISION: tl.constexpr,
    G_ALIGN: tl.constexpr, X_ALIGN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
    W_BLOCK_CI: tl.constexpr, W_BLOCK_CO: tl.constexpr, W_BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < n_data:
        _data_grad(pid, g_ptr, w_ptr, x_ptr, scale_ptr, shift_ptr, center_ptr, gx_ptr, p_ptr,
                   C_in, C_out, M, HW_out, W_out, n_ci_tiles, s_gn, s_gc, s_ghw, s_wo, s_wi,
                   s_xn, s_xc, s_xh, s_xw, s_gxn, s_gxc, s_gxh, s_gxw,
                   POOL, ACCUMULATE, PRECISION, G_ALIGN, X_ALIGN, BLOCK_P, BLOCK_CI, BLOCK_CO)
    elif WEIGHT_GRAD:
        _weight_grad(pid - n_data, g_ptr, x_ptr, scale_ptr, shift_ptr, pgw_ptr,
                     C_in, C_out, M, HW_out, W_out, w_ci_tiles, w_co_tiles, tiles_per_split, total_tiles,
                     s_gn, s_gc, s_ghw, s_xn, s_xc, s_xh, s_xw,
                     POOL, PRECISION, G_ALIGN, X_ALIGN, W_BLOCK_CI, W_BLOCK_CO, W_BLOCK_P)


def conv1x1_backward(grad_out: Tensor, x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, center: Tensor,
                     grad_x: Tensor, accumulate: bool, need_weight_grad: bool, pool: bool,
                     coef_sums: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Launches both jobs and the kernel that finishes their partials; ``grad_x`` receives (or,
    with ``accumulate``, gains) ``scale * dy`` in every element. With ``coef_sums`` = (coef_x,
    coef_c, fx, fc) that launch also adds ``fx * sum_dy_xc`` into ``coef_x`` and ``fc * sum_dy``
    into ``coef_c``.

    Returns (grad_weight, sum_dy, sum_dy_xc), all float32 (the statistics dtype of every dtype the
    kernels take); grad_weight is contiguous, or empty unless requested.
    """
    # sum_partials' pairs are (sum_dy, sum_dy_xc): its accumulators in that order
    acc = None if coef_sums is None else (coef_sums[1], coef_sums[0], coef_sums[3], coef_sums[2])
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    ho, wo = grad_out.shape[2], grad_out.shape[3]
    m = n * ho * wo
    grad_out = collapsible(grad_out)
    s_gn, s_gc, s_ghw = strides_nchw(grad_out)
    target = grad_x
    if pool:
        s_x, s_gx = x.stride(), grad_x.stride()
        x_align = 1
        if not accumulate:
            # The data job writes the inputs under the 2x2 windows only: the last row or column of
            # an odd-sized map feeds no output, so its gradient is zero, written here (without
            # accumulate every element of grad_x is written, whatever it held before).
            grad_x[:, :, 2 * ho:].zero_()
            grad_x[:, :, :2 * ho, 2 * wo:].zero_()
    else:
        x = collapsible(x)
        if collapsible(grad_x) is not grad_x:
            target = grad_x.contiguous()  # written through a collapsible copy, then copied back
        s_x = (x.stride(0), x.stride(1), 0, strides_nchw(x)[2])
        s_gx = (target.stride(0), target.stride(1), 0, strides_nchw(target)[2])
        x_align = min(row_align(x), row_align(target))
    precision = dot_precision(x.dtype)
    block_p = PIXEL_BLOCK
    block_ci = pow2_block(c_in, 16, 64)
    g_align = row_align(grad_out)
    rows, n_ci_tiles = triton.cdiv(m, block_p), triton.cdiv(c_in, block_ci)
    partials = new_stats_partials(c_in, rows, x.device)
    w_block_ci = pow2_block(c_in, 64, 64)  # wgmma's rows: at least 64
    w_block_co = pow2_block(c_out, 16, 128)
    w_block_p = weight_grad_pixel_block(precision)
    total_tiles = triton.cdiv(m, w_block_p)
    w_ci_tiles, w_co_tiles = triton.cdiv(c_in, w_block_ci), triton.cdiv(c_out, w_block_co)
    splits, per_split = split_pixel_tiles(total_tiles, w_ci_tiles * w_co_tiles, _MAX_SPLITS)
    if need_weight_grad:
        pgw = torch.empty((splits, c_in, c_out), dtype=torch.float32, device=x.device)
    else:
        pgw, splits = partials, 0  # a placeholder pointer: no program runs the weight job
    n_data = rows * n_ci_tiles
    launch(_conv1x1_bwd_kernel)[(n_data + w_ci_tiles * w_co_tiles * splits,)](
        grad_out, weight, x, scale, shift, center, target, partials, pgw,
        c_in, c_out, m, ho * wo, wo, n_data, n_ci_tiles, w_ci_tiles, w_co_tiles, per_split, total_tiles,
        s_gn, s_gc, s_ghw, weight.stride(0), weight.stride(1), *s_x, *s_gx,
        POOL=pool, ACCUMULATE=accumulate, WEIGHT_GRAD=need_weight_grad, PRECISION=precision,
        G_ALIGN=min(g_align, w_block_p), X_ALIGN=min(x_align, w_block_p),
        BLOCK_P=block_p, BLOCK_CI=block_ci, BLOCK_CO=pow2_block(c_out, 16, 32),
        W_BLOCK_CI=w_block_ci, W_BLOCK_CO=w_block_co, W_BLOCK_P=w_block_p, num_warps=8, num_stages=3)
    if target is not grad_x:
        grad_x.copy_(target)
    if need_weight_grad:
        sum_dy, sum_dy_xc, grad_weight = sum_partials(partials, pgw, torch.float32, acc)
        return grad_weight.view(weight.shape), sum_dy, sum_dy_xc
    sum_dy, sum_dy_xc, _ = sum_partials(partials, accumulate=acc)
    return torch.empty(0, dtype=torch.float32, device=x.device), sum_dy, sum_dy_xc


# No default arguments (see bn_relu_conv1x1.py): the Python wrapper below keeps them.
@torch.library.triton_op("densenet_fast_triton::bn_relu_conv1x1_backward",
                         mutates_args={"grad_x", "coef_x", "coef_c"})
def _bn_relu_conv1x1_backward_op(grad_out: Tensor, x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor,
                                 center: Tensor, grad_x: Tensor, accumulate: bool, need_weight_grad: bool,
                                 coef_x: Optional[Tensor], coef_c: Optional[Tensor], fx: Optional[Tensor],
                                 fc: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    sums = None if coef_x is None else (coef_x, coef_c, fx, fc)
    return conv1x1_backward(grad_out, x, scale, shift, weight, center, grad_x, accumulate, need_weight_grad, False,
                            sums)


def bn_relu_conv1x1_backward(grad_out: Tensor, x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor,
                             center: Tensor, grad_x: Tensor, accumulate: bool, need_weight_grad: bool,
                             coef_sums: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None,
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_weight (float32) or empty, sum_dy, sum_dy_xc); ``grad_x`` gets ``scale * dy`` (added
    with ``accumulate``). With ``coef_sums`` = (coef_x, coef_c, fx, fc), contiguous float32 vectors,
    also ``coef_x += fx * sum_dy_xc`` and ``coef_c += fc * sum_dy``, in the same launches."""
    return _bn_relu_conv1x1_backward_op(grad_out, x, scale, shift, weight, center, grad_x, accumulate,
                                        need_weight_grad, *(coef_sums or (None,) * 4))
