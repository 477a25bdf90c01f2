"""The transition: fused ``conv1x1(avg_pool2x2(relu(x * scale + shift)), weight)``.

Pooling comes before the conv (the same math, a quarter of the FLOPs), inside the prologue of the
conv1x1 kernel: each GEMM row is an output pixel and its input tile is the average of the four
normalized pixels under it. The kernel is ``bn_relu_conv1x1``'s with ``POOL`` set; odd heights and
widths drop the last row or column, as ``avg_pool2d(kernel_size=2)`` does.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .bn_relu_conv1x1 import conv1x1_forward


# No default arguments (see bn_relu_conv1x1.py): the Python wrapper below keeps them.
@torch.library.triton_op("densenet_fast_triton::bn_relu_pool_conv1x1", mutates_args={"in_coefs"})
def _bn_relu_pool_conv1x1_op(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], weight: Tensor,
                             in_mean: Optional[Tensor], in_invstd: Optional[Tensor], in_weight: Optional[Tensor],
                             in_bias: Optional[Tensor], in_coefs: Optional[Tensor]) -> Tensor:
    coefs_from = None if in_coefs is None else (in_mean, in_invstd, in_weight, in_bias, in_coefs)
    return conv1x1_forward(x, scale, shift, weight, True, False, coefs_from=coefs_from)[0]


def bn_relu_pool_conv1x1(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], weight: Tensor,
                         coefs_from: Optional[tuple] = None) -> Tensor:
    """The transition's output, a new contiguous N x C_out x H/2 x W/2 tensor. ``coefs_from``: as
    in ``bn_relu_conv1x1`` (scale and shift computed in the kernel, written into its ``coefs``)."""
    in_args = (None,) * 5 if coefs_from is None else tuple(coefs_from)
    return _bn_relu_pool_conv1x1_op(x, scale, shift, weight, *in_args)
