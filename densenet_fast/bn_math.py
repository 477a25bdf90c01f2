"""BatchNorm's arithmetic in PyTorch ops, in one place.

* :func:`rsqrt_eps` and :func:`coefficients`: a BN as ``x * scale + shift``, with ``invstd =
  rsqrt(var + eps)``, ``scale = weight * invstd`` and ``shift = bias - mean * scale``.
* :func:`chan_merge`: the count, mean and biased variance of a batch from those of its parts
  (synchronized statistics).
* :func:`update_running_stats`: torch.nn.BatchNorm's running-stats update.

Here is the math alone: the block algorithm (``stage_algorithm.py``, ``stage.py``), synchronized
statistics (``stage_sync.py``), :class:`~densenet_fast.sync_batchnorm.SyncBatchNorm2d` and the op
interface's PyTorch fallbacks (``ops/interface.py``) all call these. A backend's kernels may
compute the same things in their own launches (``csrc/``, ``ops/triton/``); the PyTorch versions
are these. Nothing here reads a tensor back to the host, and this module imports only torch, so
any layer of the package may use it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor


def rsqrt_eps(var: Tensor, eps: float, out: Optional[Tensor] = None) -> Tensor:
    """``invstd = rsqrt(var + eps)`` from the *biased* variance; into ``out`` (in its dtype, the
    statistics dtype) when given, else a new tensor (differentiable). Returns it."""
    if out is None:
        out = torch.add(var, eps)
    elif var.dtype == out.dtype:
        torch.add(var, eps, out=out)
    else:
        out.copy_(var)
        out.add_(eps)
    return out.rsqrt_()


def coefficients(mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 out: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """A BN's ``(scale, shift)``: ``scale = weight * invstd``, ``shift = bias - mean * scale``
    (``weight``/``bias`` None: 1 and 0).

    With ``out``, a (2, C) tensor whose rows are each contiguous, they are written into its rows
    (the stage's packed numbers); without, they are new tensors (differentiable; without a weight
    ``scale`` is ``invstd`` itself). The shift is one ``addcmul`` (C++'s ``coefficients_loop`` does
    the same arithmetic in the same order).
    """
    scale, shift = (None, None) if out is None else out.unbind()
    if weight is None:
        scale = invstd if scale is None else scale.copy_(invstd)
    else:
        scale = torch.mul(weight, invstd, out=scale)
    if bias is None:
        shift = torch.mul(mean, scale, out=shift).neg_()
    else:
        shift = torch.addcmul(bias, mean, scale, value=-1, out=shift)
    return scale, shift


def chan_merge(counts: Tensor, means: Tensor, variances: Tensor,
               total: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The mean and biased variance of P parts together from each part's count, mean and biased
    variance (Chan et al.'s parallel merge in weighted form, the law of total variance):

        w_p = count_p / total,   mean = sum_p w_p * mean_p,   var = sum_p w_p * (var_p + (mean_p - mean)**2)

    Stable when the mean is large: no difference of large sums of squares cancels. ``counts`` is
    (P,) in any float dtype, ``total`` its sum (computed when None; a tensor, so nothing is read
    back to the host); ``means`` and ``variances`` are (P, C). The weights are taken in ``counts``'
    dtype, then cast to ``means``'. Differentiable in ``means`` and ``variances``.
    """
    if total is None:
        total = counts.sum()
    w = (counts / total).to(means.dtype)[:, None]
    mean = (w * means).sum(0)
    var = (w * (variances + (means - mean) ** 2)).sum(0)
    return mean, var


def update_running_stats(running: Sequence[tuple[Tensor, Tensor, Optional[Tensor]]],
                         momenta: Sequence[Optional[float]], batch: Sequence[tuple[Tensor, Tensor]]) -> None:
    """torch.nn.BatchNorm's running-stats update of several BNs in place, with no host sync.

    ``running`` holds each BN's (running_mean, running_var, num_batches_tracked or None), ``batch``
    its batch mean and *unbiased* batch variance. num_batches_tracked counts up; momentum None is
    torch's cumulative average with factor 1 / num_batches_tracked (a tensor: nothing is read back),
    and without num_batches_tracked torch's factor 0.
    """
    counted = [nbt for _, _, nbt in running if nbt is not None]
    if counted:
        torch._foreach_add_(counted, 1)
    groups: dict[float, list[int]] = {}  # per momentum: one lerp (torch 2.11 has no ScalarList lerp)
    cumulative = []
    for i, (momentum, (_, _, nbt)) in enumerate(zip(momenta, running)):
        if momentum is None and nbt is not None:
            cumulative.append(i)
        else:
            groups.setdefault(0.0 if momentum is None else float(momentum), []).append(i)
    for weight, group in groups.items():
        torch._foreach_lerp_(*_lerp_lists(running, batch, group), weight)
    if cumulative:
        factors = _cumulative_factors([running[i] for i in cumulative])
        torch._foreach_lerp_(*_lerp_lists(running, batch, cumulative), [f for f in factors for _ in range(2)])


def _lerp_lists(running, batch, group) -> tuple[list[Tensor], list[Tensor]]:
    """(running means and vars, batch means and unbiased vars in their dtypes) of the BNs in ``group``."""
    targets = [t for i in group for t in running[i][:2]]
    sources = [s if s.dtype == t.dtype else s.to(t.dtype) for i in group for s, t in zip(batch[i], running[i][:2])]
    return targets, sources


def _cumulative_factors(running: Sequence[tuple[Tensor, Tensor, Tensor]]) -> list[Tensor]:
    """1 / num_batches_tracked of each BN, as 0-dim tensors of its running stats' dtype."""
    dtype = running[0][0].dtype
    factors = torch.stack([nbt for _, _, nbt in running]).to(dtype).reciprocal_()
    return [f if r[0].dtype == dtype else f.to(r[0].dtype) for f, r in zip(factors.unbind(), running)]
