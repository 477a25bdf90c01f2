"""The ground truth of the op suite: every op of the interface (``interface.py``) written plainly in
PyTorch, one function per op, with the interface's signature and side effects (``out``, ``grad_x``,
:class:`StatsOut`, :class:`CoefsFrom`, :class:`CoefSums` are written in place as a backend writes them).

The tests run each function twice: on float64 copies of a case's tensors (the truth every backend is
compared with), and on the case's own tensors (what PyTorch itself gets in that dtype; for float16
and bfloat16 its error bounds the backends' error, see tests/helpers.py). So the functions are
dtype-generic and follow the interface's dtype rules, nothing more: the BN-ReLU is computed in the
wider of the activations' and the statistics dtype and rounded to the activations' dtype, the
convolutions run in the activations' dtype, statistics, reductions and weight gradients come out in
the statistics dtype (``interface.stats_dtype``). Nothing here is fused, chunked or fast; the
backward ops are PyTorch's autograd through the forward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .interface import CoefsFrom, CoefSums, ConvGrads, StatsOut, stats_dtype

__all__ = [
    "bn_coefficients", "bn_grad_finalize", "bn_relu", "bn_relu_conv1x1", "bn_relu_conv1x1_backward",
    "bn_relu_conv3x3", "bn_relu_conv3x3_backward", "bn_relu_pool_conv1x1", "bn_relu_pool_conv1x1_backward",
    "channel_stats",
]


def _c(v: Tensor) -> Tensor:
    """A per-channel vector, broadcast over N x C x H x W."""
    return v[:, None, None]


def bn_relu(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``relu(x * scale + shift)``, rounded to ``x``'s dtype."""
    return torch.relu(x * _c(scale) + _c(shift)).to(x.dtype)


def _statistics(t: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``t`` over N, H, W, in the statistics dtype."""
    t = t.to(stats_dtype(t.dtype))
    return t.mean((0, 2, 3)), t.var((0, 2, 3), unbiased=False)


def _coefficients(mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]
                  ) -> tuple[Tensor, Tensor]:
    scale = invstd if weight is None else weight * invstd
    shift = -mean * scale if bias is None else bias - mean * scale
    return scale, shift


def _stats_result(mean: Tensor, var: Tensor, stats_into: Optional[StatsOut], count: int):
    """What an op returns of its statistics, or writes into ``stats_into``: the mean, the unbiased
    variance and invstd (of the biased one), and with ``coefs`` the next BN's scale and shift."""
    if stats_into is None:
        return mean, var
    stats_into.stats[0].copy_(mean)
    stats_into.stats[1].copy_(var * count / (count - 1) if count > 1 else torch.full_like(var, float("nan")))
    invstd = (var + stats_into.eps).rsqrt()
    stats_into.stats[2].copy_(invstd)
    if stats_into.coefs is not None:
        scale, shift = _coefficients(mean, invstd, stats_into.weight, stats_into.bias)
        stats_into.coefs[0].copy_(scale)
        stats_into.coefs[1].copy_(shift)
    return None, None


def _count(t: Tensor) -> int:
    return t.numel() // max(1, t.shape[1])


def channel_stats(x: Tensor, stats_into: Optional[StatsOut] = None, out: Optional[Tensor] = None):
    """Per-channel mean and biased variance of ``x`` (or written into ``stats_into``); ``x`` copied into ``out``."""
    if out is not None:
        out.copy_(x)
    return _stats_result(*_statistics(x), stats_into, _count(x))


def bn_coefficients(mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    coefs: Tensor) -> None:
    """``coefs[0] = weight * invstd``, ``coefs[1] = bias - mean * coefs[0]`` (weight, bias None: 1, 0)."""
    scale, shift = _coefficients(mean, invstd, weight, bias)
    coefs[0].copy_(scale)
    coefs[1].copy_(shift)


def _coefficients_first(coefs_from: Optional[CoefsFrom]) -> None:
    if coefs_from is not None:
        bn_coefficients(*coefs_from)


def bn_relu_conv1x1(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, with_stats: bool,
                    stats_into: Optional[StatsOut] = None, coefs_from: Optional[CoefsFrom] = None):
    """``(z, mean, var)``: ``z = conv1x1(relu(x * scale + shift), weight)`` and its statistics."""
    _coefficients_first(coefs_from)  # scale and shift are views of coefs_from.coefs, then
    z = F.conv2d(bn_relu(x, scale, shift), weight).contiguous()
    if not with_stats:
        return z, None, None
    return (z, *_stats_result(*_statistics(z), stats_into, _count(z)))


def bn_relu_conv3x3(z: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, out: Tensor, noise: Optional[Tensor],
                    with_stats: bool, stats_into: Optional[StatsOut] = None):
    """``out = conv3x3(relu(z * scale + shift), weight, padding=1) * noise``; its statistics."""
    f = F.conv2d(bn_relu(z, scale, shift), weight, padding=1)
    if noise is not None:
        f = f * noise
    out.copy_(f)
    return _stats_result(*_statistics(out), stats_into, _count(out)) if with_stats else (None, None)


def _pool_conv(y: Tensor, weight: Tensor) -> Tensor:
    # torchvision's transition order: the conv, then the pooling.
    return F.avg_pool2d(F.conv2d(y, weight), 2)


def bn_relu_pool_conv1x1(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor,
                         coefs_from: Optional[CoefsFrom] = None) -> Tensor:
    """The transition: ``avg_pool2x2(conv1x1(relu(x * scale + shift), weight))``."""
    _coefficients_first(coefs_from)
    return _pool_conv(bn_relu(x, scale, shift), weight)


def _backward(layer, grad_out: Tensor, x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, center: Tensor,
              grad_x: Tensor, accumulate: bool, need_weight_grad: bool) -> ConvGrads:
    """Autograd through ``layer(relu(x * scale + shift), weight)``: ``dy`` is the gradient of the
    BN output ``v = x * scale + shift`` (in x's dtype, as the forward rounds it: what autograd gives
    in half precision); ``grad_x`` receives ``scale * dy`` (added with ``accumulate``)."""
    v = (x * _c(scale) + _c(shift)).to(x.dtype).detach().requires_grad_(True)
    w = weight.detach().requires_grad_(need_weight_grad)
    layer(torch.relu(v), w).backward(grad_out)
    dy = v.grad
    contribution = _c(scale) * dy
    grad_x.copy_(grad_x + contribution if accumulate else contribution)
    sdt = stats_dtype(x.dtype)
    dy = dy.to(sdt)
    return ConvGrads(w.grad.to(sdt) if need_weight_grad else None, dy.sum((0, 2, 3)),
                     (dy * (x.to(sdt) - _c(center))).sum((0, 2, 3)))


def _add_coef_sums(coef_sums: Optional[CoefSums], grads: ConvGrads) -> ConvGrads:
    if coef_sums is not None:
        coef_sums.coef_x.copy_(coef_sums.coef_x + coef_sums.fx * grads.sum_dy_xc)
        coef_sums.coef_c.copy_(coef_sums.coef_c + coef_sums.fc * grads.sum_dy)
    return grads


def bn_relu_conv1x1_backward(grad_out: Tensor, x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor,
                             center: Tensor, grad_x: Tensor, accumulate: bool, need_weight_grad: bool,
                             coef_sums: Optional[CoefSums] = None) -> ConvGrads:
    """Backward of :func:`bn_relu_conv1x1`: ``ConvGrads(grad_weight, sum(dy), sum(dy * (x - center)))``,
    ``scale * dy`` written (or added) into ``grad_x``, ``coef_sums`` accumulated."""
    return _add_coef_sums(coef_sums, _backward(F.conv2d, grad_out, x, scale, shift, weight, center, grad_x,
                                               accumulate, need_weight_grad))


def bn_relu_conv3x3_backward(grad_out: Tensor, z: Tensor, scale: Tensor, shift: Tensor, weight: Tensor,
                             center: Tensor, grad_x: Tensor, accumulate: bool, need_weight_grad: bool) -> ConvGrads:
    """Backward of :func:`bn_relu_conv3x3` (``grad_out`` already carries dropout's mask)."""
    return _backward(lambda y, w: F.conv2d(y, w, padding=1), grad_out, z, scale, shift, weight, center, grad_x,
                     accumulate, need_weight_grad)


def bn_relu_pool_conv1x1_backward(grad_out: Tensor, x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor,
                                  center: Tensor, grad_x: Tensor, accumulate: bool, need_weight_grad: bool,
                                  coef_sums: Optional[CoefSums] = None) -> ConvGrads:
    """Backward of :func:`bn_relu_pool_conv1x1`; the last row/column of an odd-sized map gets no gradient."""
    return _add_coef_sums(coef_sums, _backward(_pool_conv, grad_out, x, scale, shift, weight, center, grad_x,
                                               accumulate, need_weight_grad))


def bn_grad_finalize(grad_x: Tensor, x: Tensor, center: Tensor, coef_x: Tensor, coef_c: Tensor,
                     factors: Optional[tuple[Tensor, Tensor]] = None) -> None:
    """In place: ``grad_x += coef_x * (x - center) + coef_c`` (times ``factors`` ``(fx, fc)`` when given)."""
    if factors is not None:
        coef_x, coef_c = factors[0] * coef_x, factors[1] * coef_c
    grad_x.copy_(grad_x + _c(coef_x) * (x - _c(center)) + _c(coef_c))
