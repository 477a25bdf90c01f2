"""The ``cpp`` backend: the op interface as fused CPU ops of the compiled extension ``densenet_fast._C`` (csrc/).

Each interface method is one fused C++ op (``torch.ops.densenet_fast.*``, see extension_ops.py):
the BN-ReLU prologue is recomputed tile by tile next to ATen's GEMMs, and the backward's ReLU
mask, its two reductions and the write (or accumulation) into the gradient buffer are one pass.
CPU tensors of float32 and float64. The extension's CUDA kernels run as backend ``composite``
(composite_backend.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .extension_ops import bottleneck_memory_format, built_with_cuda, ops, walkable
from .interface import Backend, ConvGrads, StatsOut, Unsupported, add_coef_sums, coefficients_first

__all__ = ["CppBackend", "built_with_cuda"]

_DTYPES = (torch.float32, torch.float64)


def _grads(result, need_weight_grad: bool) -> ConvGrads:
    grad_weight, sum_dy, sum_dy_xc = result
    return ConvGrads(grad_weight if need_weight_grad else None, sum_dy, sum_dy_xc)


class CppBackend(Backend):
    """The fused CPU ops (float32, float64)."""

    name = "cpp"

    def supports(self, x: Tensor) -> Optional[Unsupported]:
        if x.device.type == "cuda":
            return Unsupported("backend 'cpp' runs on CPU tensors; the extension's CUDA kernels run as backend "
                               "'composite'")
        if x.device.type != "cpu":
            return Unsupported(f"backend 'cpp' runs on CPU tensors, got a {x.device.type} tensor")
        if x.dtype not in _DTYPES:
            return Unsupported(f"backend 'cpp' on CPU expects float32 or float64 tensors, got {x.dtype}", TypeError)
        return None

    @staticmethod
    def _stats_result(mean: Tensor, var: Tensor, stats_into: Optional[StatsOut], produced: Tensor):
        """interface.stats_result, with the rows written by one C++ op."""
        if stats_into is None:
            return mean, var
        s = stats_into
        ops.write_stats(s.stats, mean, var, produced.numel() // max(1, produced.shape[1]), s.eps, s.weight, s.bias,
                        s.coefs)
        return None, None

    def bottleneck_memory_format(self, dtype, channels):
        return bottleneck_memory_format(dtype, channels)

    def bn_coefficients(self, mean, invstd, weight, bias, coefs):
        ops.bn_coefficients(mean, invstd, weight, bias, coefs)

    def channel_stats(self, x, stats_into=None, out=None):
        if out is not None:
            out.copy_(x)
        return self._stats_result(*ops.channel_stats(walkable(x) if x.dim() == 4 else x), stats_into, x)

    def bn_relu_conv1x1(self, x, scale, shift, weight, with_stats, stats_into=None, coefs_from=None):
        coefficients_first(self, coefs_from)
        z, mean, var = ops.bn_relu_conv1x1(x, scale, shift, weight, with_stats)
        return (z, *self._stats_result(mean, var, stats_into, z)) if with_stats else (z, None, None)

    def bn_relu_conv3x3(self, z, scale, shift, weight, out, noise, with_stats, stats_into=None):
        mean, var = ops.bn_relu_conv3x3(z, scale, shift, weight, out, noise, with_stats)
        return self._stats_result(mean, var, stats_into, out) if with_stats else (None, None)

    def bn_relu_conv1x1_backward(self, grad_out, x, scale, shift, weight, center, grad_x, accumulate,
                                 need_weight_grad, coef_sums=None):
        result = ops.bn_relu_conv1x1_backward(walkable(grad_out), x, scale, shift, weight, center, grad_x, accumulate,
                                              need_weight_grad)
        return add_coef_sums(coef_sums, _grads(result, need_weight_grad))

    def bn_relu_conv3x3_backward(self, grad_out, z, scale, shift, weight, center, grad_x, accumulate,
                                 need_weight_grad):
        result = ops.bn_relu_conv3x3_backward(walkable(grad_out), z, scale, shift, weight, center, grad_x, accumulate,
                                              need_weight_grad)
        return _grads(result, need_weight_grad)

    def bn_relu_pool_conv1x1(self, x, scale, shift, weight, coefs_from=None):
        coefficients_first(self, coefs_from)
        return ops.bn_relu_pool_conv1x1(x, scale, shift, weight)

    def bn_relu_pool_conv1x1_backward(self, grad_out, x, scale, shift, weight, center, grad_x, accumulate,
                                      need_weight_grad, coef_sums=None):
        result = ops.bn_relu_pool_conv1x1_backward(walkable(grad_out), x, scale, shift, weight, center, grad_x,
                                                   accumulate, need_weight_grad)
        return add_coef_sums(coef_sums, _grads(result, need_weight_grad))

    def bn_grad_finalize(self, grad_x, x, center, coef_x, coef_c, factors=None):
        if factors is not None:
            coef_x, coef_c = torch._foreach_mul(list(factors), [coef_x, coef_c])
        ops.bn_grad_finalize(grad_x, x, center, coef_x, coef_c)
