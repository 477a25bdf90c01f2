"""The ``triton`` backend: the op interface on the fused Triton kernels of ``ops/triton/``.

Each interface method is one registered op (``torch.ops.densenet_fast_triton.*``); this class only
adapts the interface's optional outputs (statistics, coefficients) to the ops' fixed signatures.
It computes on CUDA tensors, and on CPU tensors when the kernels were decorated under Triton's
interpreter (``TRITON_INTERPRET=1`` set before this module was imported; that is how the tests run).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .interface import Backend, CoefsFrom, CoefSums, ConvGrads, StatsOut, Unsupported

try:
    from triton.runtime.jit import JITFunction

    from .triton import (
        SUPPORTED_DTYPES,
        bn_coefficients,
        bn_grad_finalize,
        bn_relu_conv1x1,
        bn_relu_conv1x1_backward,
        bn_relu_conv3x3,
        bn_relu_conv3x3_backward,
        bn_relu_pool_conv1x1,
        bn_relu_pool_conv1x1_backward,
        channel_stats,
    )
    from .triton.bn_relu_conv1x1 import _conv1x1_fwd_kernel
except ImportError as err:  # the registry turns this into "backend unavailable"
    raise ImportError(f"the triton backend needs the 'triton' package: {err}") from err

# How the kernels were decorated: interpreted kernels run on CPU tensors (numpy), compiled ones on CUDA.
_INTERPRETED = not isinstance(_conv1x1_fwd_kernel, JITFunction)


def _vec(t: Tensor) -> Tensor:
    """Per-channel vectors are read with unit stride by the kernels."""
    return t.contiguous()


def _vec_or_none(t):
    return None if t is None else _vec(t)


def _into(stats_into: Optional[StatsOut]) -> tuple:
    """The ops' trailing arguments for a StatsOut: the statistics are finished, and the BN
    coefficients computed, in the launch that finishes the op's partials (their defaults without one)."""
    if stats_into is None:
        return None, None, None, None, 0.0
    return stats_into.stats, stats_into.coefs, _vec_or_none(stats_into.weight), _vec_or_none(stats_into.bias), \
        stats_into.eps


def _sums(coef_sums: Optional[CoefSums]) -> Optional[tuple]:
    """The kernels' (coef_x, coef_c, fx, fc) of a CoefSums: they add into the first two in place."""
    if coef_sums is None:
        return None
    sums = tuple(_vec(t) for t in coef_sums)
    if any(a is not b for a, b in zip(sums[:2], coef_sums[:2])):
        raise ValueError("coef_sums' accumulators must be contiguous: the op adds into them in place")
    return sums


def _from(coefs_from: CoefsFrom) -> tuple:
    """The kernels' (mean, invstd, weight, bias, coefs) of a CoefsFrom: they write ``coefs`` in place."""
    return _vec(coefs_from.mean), _vec(coefs_from.invstd), _vec_or_none(coefs_from.weight), \
        _vec_or_none(coefs_from.bias), coefs_from.coefs


def _backward(launcher, grad_out, x, scale, shift, weight, center, grad_x, accumulate, need_weight_grad,
              *coef_sums) -> ConvGrads:
    """A backward launcher on the interface's arguments (per-channel vectors made unit-stride)."""
    grad_w, sum_dy, sum_dy_xc = launcher(grad_out, x, _vec(scale), _vec(shift), weight, _vec(center), grad_x,
                                         accumulate, need_weight_grad, *coef_sums)
    return ConvGrads(grad_w if need_weight_grad else None, sum_dy, sum_dy_xc)


class TritonBackend(Backend):
    name = "triton"

    def __init__(self) -> None:
        if not _INTERPRETED and not torch.cuda.is_available():
            raise RuntimeError("the triton backend needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)")

    def supports(self, x: Tensor) -> Optional[Unsupported]:
        if x.dtype not in SUPPORTED_DTYPES:
            return Unsupported(f"backend 'triton' computes on float32, float16 and bfloat16 tensors, got {x.dtype}",
                               TypeError)
        if x.device.type == "cuda":
            if _INTERPRETED:
                return Unsupported("backend 'triton' was loaded under TRITON_INTERPRET=1; it serves CPU tensors only")
            return None
        if x.device.type != "cpu":
            return Unsupported(f"backend 'triton' computes on CUDA tensors, got a {x.device.type} tensor")
        if not _INTERPRETED:
            return Unsupported(
                "backend 'triton' computes on CUDA tensors; CPU tensors need Triton's interpreter "
                "(set TRITON_INTERPRET=1 before densenet_fast's triton backend is first imported)")
        if x.dtype == torch.bfloat16:
            # Triton's interpreter returns wrong tl.dot results for bfloat16 operands.
            return Unsupported("backend 'triton' does not compute bfloat16 under Triton's interpreter; use CUDA",
                               TypeError)
        return None

    def channel_stats(self, x, stats_into=None, out=None):
        mean, var = channel_stats(x, *_into(stats_into), out)
        return (mean, var) if stats_into is None else (None, None)

    def bn_relu_conv1x1(self, x, scale, shift, weight, with_stats, stats_into=None, coefs_from=None):
        # With coefs_from the kernel computes scale and shift itself (and writes them).
        affine = (None, None) if coefs_from is not None else (_vec(scale), _vec(shift))
        z, mean, var = bn_relu_conv1x1(x, *affine, weight, with_stats, *_into(stats_into),
                                       coefs_from=None if coefs_from is None else _from(coefs_from))
        return (z, mean, var) if with_stats and stats_into is None else (z, None, None)

    def bn_relu_conv3x3(self, z, scale, shift, weight, out, noise, with_stats, stats_into=None):
        mean, var = bn_relu_conv3x3(z, _vec(scale), _vec(shift), weight, out, noise, with_stats, *_into(stats_into))
        return (mean, var) if with_stats and stats_into is None else (None, None)

    def bn_relu_conv1x1_backward(self, grad_out, x, scale, shift, weight, center, grad_x, accumulate,
                                 need_weight_grad, coef_sums=None):
        return _backward(bn_relu_conv1x1_backward, grad_out, x, scale, shift, weight, center, grad_x, accumulate,
                         need_weight_grad, _sums(coef_sums))

    def bn_relu_conv3x3_backward(self, grad_out, z, scale, shift, weight, center, grad_x, accumulate,
                                 need_weight_grad):
        return _backward(bn_relu_conv3x3_backward, grad_out, z, scale, shift, weight, center, grad_x, accumulate,
                         need_weight_grad)

    def bn_relu_pool_conv1x1(self, x, scale, shift, weight, coefs_from=None):
        if coefs_from is not None:
            return bn_relu_pool_conv1x1(x, None, None, weight, _from(coefs_from))
        return bn_relu_pool_conv1x1(x, _vec(scale), _vec(shift), weight)

    def bn_relu_pool_conv1x1_backward(self, grad_out, x, scale, shift, weight, center, grad_x, accumulate,
                                      need_weight_grad, coef_sums=None):
        return _backward(bn_relu_pool_conv1x1_backward, grad_out, x, scale, shift, weight, center, grad_x,
                         accumulate, need_weight_grad, _sums(coef_sums))

    def bn_grad_finalize(self, grad_x, x, center, coef_x, coef_c, factors=None):
        fx, fc = (None, None) if factors is None else (_vec(factors[0]), _vec(factors[1]))
        bn_grad_finalize(grad_x, x, _vec(center), _vec(coef_x), _vec(coef_c), fx, fc)

    def bn_coefficients(self, mean, invstd, weight, bias, coefs):
        bn_coefficients(_vec(mean), _vec(invstd), _vec_or_none(weight), _vec_or_none(bias), coefs)
