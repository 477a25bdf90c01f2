"""The transition: fused ``conv1x1(avg_pool2x2(relu(x * scale + shift)), weight)``.

Pooling comes before the conv (the same math, a quarter of the FLOPs), inside the prologue of the
conv1x1 kernel: each GEMM row is an output pixel and its input tile is the average of the four
normalized pixels under it. The kernel is ``bn_relu_conv1x1``'s with ``POOL`` set; odd heights and
widths drop the last row or column, as ``avg_pool2d(kernel_size=2)`` does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .bn_relu_conv1x1 import conv1x1_forward
from .common import ref_bn_relu


@torch.library.triton_op("densenet_fast_triton::bn_relu_pool_conv1x1", mutates_args=())
def bn_relu_pool_conv1x1(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor) -> Tensor:
    """The transition's output, a new contiguous N x C_out x H/2 x W/2 tensor."""
    return conv1x1_forward(x, scale, shift, weight, True, False)[0]


def bn_relu_pool_conv1x1_ref(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor) -> Tensor:
    """PyTorch reference of :func:`bn_relu_pool_conv1x1` (float64 math)."""
    return F.conv2d(F.avg_pool2d(ref_bn_relu(x, scale, shift), 2), weight.double()).to(x.dtype)
