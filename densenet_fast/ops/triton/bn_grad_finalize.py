"""In place ``grad_x += coef_x * (x - center) + coef_c``: BN's backward through the batch statistics,
applied once per channel of the gradient buffer (``stage.py`` sums the coefficients of every BN that
read the channel). An elementwise kernel over (tile of the batch's pixels, channel tile); the
arithmetic is float32 whatever the activations' dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import collapsible, launch, pixel_rows, pow2_block, row_align, strides_nchw

_TILE_P = 128


@triton.jit(do_not_specialize=["M", "n_c_tiles"])
def _bn_grad_finalize_kernel(
    gx_ptr, x_ptr, center_ptr, coef_x_ptr, coef_c_ptr, fx_ptr, fc_ptr, C, M, HW, n_c_tiles,
    s_gn, s_gc, s_ghw, s_xn, s_xc, s_xhw,
    HAS_FACTORS: tl.constexpr, ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0) // n_c_tiles
    offs_c = (tl.program_id(0) % n_c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    p_ok, _, _, x_rows = pixel_rows(pid_m, M, HW, s_xn, s_xhw, BLOCK_P, ALIGN)
    _, _, _, g_rows = pixel_rows(pid_m, M, HW, s_gn, s_ghw, BLOCK_P, ALIGN)
    valid = p_ok[:, None] & c_ok[None, :]
    center = tl.load(center_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    coef_x = tl.load(coef_x_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    coef_c = tl.load(coef_c_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_FACTORS:
        coef_x = coef_x * tl.load(fx_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        coef_c = coef_c * tl.load(fc_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + x_rows[:, None] + offs_c[None, :] * s_xc, mask=valid, other=0.0)
    gx_ptrs = gx_ptr + g_rows[:, None] + offs_c[None, :] * s_gc
    g = tl.load(gx_ptrs, mask=valid, other=0.0).to(tl.float32)
    g += coef_x[None, :] * (x.to(tl.float32) - center[None, :]) + coef_c[None, :]
    tl.store(gx_ptrs, g.to(gx_ptr.dtype.element_ty), mask=valid)


@torch.library.triton_op("densenet_fast_triton::bn_grad_finalize", mutates_args={"grad_x"})
def bn_grad_finalize(grad_x: Tensor, x: Tensor, center: Tensor, coef_x: Tensor, coef_c: Tensor,
                     factor_x: Optional[Tensor] = None, factor_c: Optional[Tensor] = None) -> None:
    """``grad_x += coef_x * (x - center) + coef_c`` with per-channel coefficients, in place; with
    ``factor_x`` and ``factor_c`` the coefficients are first multiplied by them."""
    n, c, h, w = x.shape
    m = n * h * w
    x = collapsible(x)
    target = grad_x if collapsible(grad_x) is grad_x else grad_x.contiguous()
    tile_p = _TILE_P  # tiles span images: one size for every map (fewer variants to compile)
    block_c = pow2_block(c, 16, 32)
    n_c_tiles = triton.cdiv(c, block_c)
    launch(_bn_grad_finalize_kernel)[(triton.cdiv(m, tile_p) * n_c_tiles,)](
        target, x, center, coef_x, coef_c, factor_x if factor_x is not None else coef_x,
        factor_c if factor_c is not None else coef_c, c, m, h * w, n_c_tiles, *strides_nchw(target), *strides_nchw(x),
        HAS_FACTORS=factor_x is not None, ALIGN=min(row_align(x), row_align(target)), BLOCK_P=tile_p, BLOCK_C=block_c,
        num_warps=4)
    if target is not grad_x:
        grad_x.copy_(target)
