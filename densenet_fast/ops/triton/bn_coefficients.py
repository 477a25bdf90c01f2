"""A BN's per-channel coefficients from its statistics: ``scale = weight * invstd``,
``shift = bias - mean * scale``, written into a (2, C) view (the stage's packed numbers), in one
launch where PyTorch ops take two. ``affine_coefficients`` is the same math inside another kernel
(``partials.py`` finishes a bottleneck's statistics with it).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import launch

_BLOCK = 256


@triton.jit
def affine_coefficients(mean, invstd, w_ptr, b_ptr, offs, ok, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(scale, shift) of channels ``offs``: weight * invstd and bias - mean * scale (1 and 0 without)."""
    scale = invstd
    if HAS_WEIGHT:
        scale = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32) * invstd
    shift = -mean * scale
    if HAS_BIAS:
        shift = tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32) - mean * scale
    return scale, shift


@triton.jit
def _bn_coefficients_kernel(mean_ptr, invstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, C,
                            HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < C
    mean = tl.load(mean_ptr + offs, mask=ok, other=0.0)
    invstd = tl.load(invstd_ptr + offs, mask=ok, other=0.0)
    scale, shift = affine_coefficients(mean, invstd, w_ptr, b_ptr, offs, ok, HAS_WEIGHT, HAS_BIAS)
    tl.store(scale_ptr + offs, scale, mask=ok)
    tl.store(shift_ptr + offs, shift, mask=ok)


@torch.library.triton_op("densenet_fast_triton::bn_coefficients", mutates_args={"coefs"})
def bn_coefficients(mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    coefs: Tensor) -> None:
    """Writes scale and shift into the rows of the float32 (2, C) ``coefs`` (each row contiguous);
    ``mean`` and ``invstd`` contiguous float32 vectors, ``weight``/``bias`` any float dtype."""
    c = mean.shape[0]
    scale, shift = coefs.unbind()
    if any(t.stride(0) != 1 for t in (mean, invstd, scale, shift) if c > 1):
        raise ValueError("bn_coefficients reads and writes contiguous per-channel vectors")
    launch(_bn_coefficients_kernel)[(triton.cdiv(c, _BLOCK),)](
        mean, invstd, weight if weight is not None else mean, bias if bias is not None else mean, scale, shift, c,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK=_BLOCK, num_warps=4)
