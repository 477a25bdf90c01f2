"""ATen's convolution backward under a name: the one call through which the torch and composite
backends take a chunk's conv gradients (stride 1, no bias, one group; padding 0 or 1), and the
accumulator they sum a chunked weight gradient in."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .interface import stats_dtype


def weight_grad_accumulator(weight: Tensor) -> Tensor:
    """Zeros for a weight gradient summed over chunks of images: in the statistics dtype, so half
    precision rounds once, and contiguous (the interface's ConvGrads). ``weight`` arrives in the
    activations' dtype."""
    return torch.zeros(weight.shape, dtype=stats_dtype(weight.dtype), device=weight.device)


def conv_backward(grad_out: Tensor, y: Tensor, weight: Tensor, padding: int, need_weight_grad: bool
                  ) -> tuple[Tensor, Optional[Tensor]]:
    """The input gradient of ``conv2d(y, weight, padding=padding)`` and, with ``need_weight_grad``,
    its weight gradient (else None). The input gradient reads only ``y``'s shape, never its values."""
    grad_y, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_out, y, weight, None, [1, 1], [padding, padding], [1, 1], False, [0, 0], 1,
        [True, need_weight_grad, False])
    return grad_y, grad_w
