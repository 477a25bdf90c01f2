"""Backward of the transition's fused BN-ReLU-avgpool2x2-conv1x1.

The kernels are ``bn_relu_conv1x1_backward``'s with ``POOL`` set: the data kernel spreads a quarter
of each pooled gradient over the four inputs under it, masked by their recomputed ReLU; the weight
kernel recomputes the pooled normalized input tile by tile. Inputs in the last row or column of an
odd-sized map feed no output: their gradient is zero (without ``accumulate`` the launcher writes
those zeros, since the kernel never visits them) and they are left out of the reductions (where
such an input is infinite, torch's 0 * x there would be NaN; the batch statistics of its channel
are not finite anyway).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .bn_relu_conv1x1_backward import conv1x1_backward


# No default arguments (see bn_relu_conv1x1.py): the Python wrapper below keeps them. The signature
# twins bn_relu_conv1x1_backward's registered op on purpose: one registered op per interface
# method (torch.compile and the profiles name the transition's), both calling conv1x1_backward.
@torch.library.triton_op("densenet_fast_triton::bn_relu_pool_conv1x1_backward",
                         mutates_args={"grad_x", "coef_x", "coef_c"})
def _bn_relu_pool_conv1x1_backward_op(grad_out: Tensor, x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor,
                                      center: Tensor, grad_x: Tensor, accumulate: bool, need_weight_grad: bool,
                                      coef_x: Optional[Tensor], coef_c: Optional[Tensor], fx: Optional[Tensor],
                                      fc: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    sums = None if coef_x is None else (coef_x, coef_c, fx, fc)
    return conv1x1_backward(grad_out, x, scale, shift, weight, center, grad_x, accumulate, need_weight_grad, True,
                            sums)


def bn_relu_pool_conv1x1_backward(grad_out: Tensor, x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor,
                                  center: Tensor, grad_x: Tensor, accumulate: bool, need_weight_grad: bool,
                                  coef_sums: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None,
                                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_weight (float32) or empty, sum_dy, sum_dy_xc); ``grad_x`` gets ``scale * dy`` (added
    with ``accumulate``) in every element, 0 in the last row/column of an odd-sized map, which
    feeds no pooling window; ``coef_sums`` as in ``bn_relu_conv1x1_backward``.
    """
    return _bn_relu_pool_conv1x1_backward_op(grad_out, x, scale, shift, weight, center, grad_x, accumulate,
                                             need_weight_grad, *(coef_sums or (None,) * 4))
