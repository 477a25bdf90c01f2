"""The per-layer op interface that every backend implements.

The block algorithm (``densenet_fast.stage_algorithm``) owns the batch-norm bookkeeping: statistics, running
stats, the per-channel ``scale``/``shift`` of each BN, and the folding of BN's backward into
per-channel constants. A backend only provides the fused "affine-ReLU-conv" pieces below, which see
BN as ``relu(x * scale + shift)`` with one ``scale`` and ``shift`` per input channel.

Conventions shared by every op:

* ``x`` is N x C x H x W and may be a channel-prefix view of a block's feature buffer, so it is not
  contiguous in general; buffers are NCHW or channels_last. ``scale``, ``shift`` and ``center`` are
  1-D with C entries, in the statistics dtype (float32 for float16/bfloat16 activations, else the
  activations' dtype). Conv weights arrive in the activations' dtype (under autocast the block
  casts them). Returned statistics and reductions are in the statistics dtype.
* ``dy`` below is the gradient with respect to ``x * scale + shift`` (the BN output), that is the
  conv's input gradient masked by the ReLU. Backward ops never return ``dy`` itself: they return
  the two per-channel reductions BN's backward needs, ``sum(dy)`` and ``sum(dy * (x - center))``
  over N, H, W (and the conv's weight gradient, see :class:`ConvGrads`), and write ``scale * dy``
  into the gradient accumulator ``grad_x``, which the caller allocates: a tensor of ``x``'s shape
  and dtype in ``x``'s layout (NCHW or channels_last; it may be a channel-prefix view of the
  stage's gradient buffer). With ``accumulate`` they add, ``grad_x += scale * dy``; without it
  ``grad_x = scale * dy``, every element written and its previous contents never read (an input
  that feeds no output, as the last row or column of an odd-sized map under the transition's
  pooling, gets 0).
* Normalized activations ``relu(x * scale + shift)`` are recomputed inside the ops and never stored
  for a whole prefix; how much of them exists at once is the backend's business (a chunk of images,
  a GEMM tile).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..bn_math import coefficients, rsqrt_eps


class ConvGrads(NamedTuple):
    """What a fused BN-ReLU-conv backward returns (the input gradient went into the caller's ``grad_x``)."""

    grad_weight: Optional[Tensor]  # None when not requested; else the weight's shape, contiguous, statistics dtype
    sum_dy: Tensor  # per input channel, statistics dtype
    sum_dy_xc: Tensor  # sum(dy * (x - center)) per input channel


class StatsOut(NamedTuple):
    """Where an op that produces a tensor writes its batch statistics and what follows from them.

    ``stats`` is a (3, C) view whose rows receive the mean, the *unbiased* variance (``M / (M - 1)``
    times the biased one, over the M values of a channel: what running stats take) and ``invstd =
    rsqrt(biased var + eps)`` of each produced channel; ``coefs``, when given, a (2, C) view
    whose rows receive the coefficients of the BN that reads those channels, ``scale = weight *
    invstd`` and ``shift = bias - mean * scale`` (``weight``/``bias`` None: 1 and 0). In the
    statistics dtype; rows may lie apart but each is contiguous (the stage's packed numbers). A
    backend that finishes its statistics on the device writes them all in the same launch; the
    others call :func:`write_stats`.
    """

    stats: Tensor
    eps: float
    coefs: Optional[Tensor] = None
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None


class CoefSums(NamedTuple):
    """Where a backward op adds its BN's batch-statistics terms (stage_algorithm's docstring): the
    rows ``coef_x += fx * sum_dy_xc`` and ``coef_c += fc * sum_dy`` of the stage's accumulator, with
    the BN's per-channel factors ``fx``, ``fc``; all in the statistics dtype, each contiguous. A
    backend that finishes its reductions on the device adds them in that launch; the others call
    :func:`add_coef_sums`.
    """

    coef_x: Tensor
    coef_c: Tensor
    fx: Tensor
    fc: Tensor


class CoefsFrom(NamedTuple):
    """A BN whose coefficients an op computes before it applies them: from the batch ``mean`` and
    ``invstd`` of its channels and its ``weight``/``bias`` (None: 1 and 0) into ``coefs``, the
    (2, C) block whose rows are the ``scale`` and ``shift`` the op is given (outputs, then). In the
    statistics dtype, rows contiguous. A backend that can computes them inside the op's launch (and
    writes ``coefs`` there); the others call :meth:`Backend.bn_coefficients` first, through
    :func:`coefficients_first`.
    """

    mean: Tensor
    invstd: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    coefs: Tensor


def coefficients_first(backend: Backend, coefs_from: Optional[CoefsFrom]) -> None:
    """Writes the coefficients ``coefs_from`` asks for, before an op that applies them runs."""
    if coefs_from is not None:
        backend.bn_coefficients(*coefs_from)


def add_coef_sums(into: Optional[CoefSums], grads: ConvGrads) -> ConvGrads:
    """Adds a backward op's terms ``into`` the accumulator, in one PyTorch op; returns ``grads``."""
    if into is not None:
        torch._foreach_addcmul_([into.coef_x, into.coef_c], [into.fx, into.fc], [grads.sum_dy_xc, grads.sum_dy])
    return grads


def write_stats(into: StatsOut, mean: Tensor, var: Tensor, count: int) -> None:
    """Writes ``into`` from the batch statistics ``mean`` and biased ``var`` of ``count`` values per
    channel, in PyTorch ops."""
    out_mean, out_var, invstd = into.stats.unbind()
    out_mean.copy_(mean)
    torch.mul(var, count / (count - 1) if count > 1 else float("nan"), out=out_var)
    rsqrt_eps(var, into.eps, invstd)
    if into.coefs is not None:
        write_coefficients(out_mean, invstd, into.weight, into.bias, into.coefs)


def write_coefficients(mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       coefs: Tensor) -> None:
    """A BN's (2, C) ``coefs``: ``scale = weight * invstd``, ``shift = bias - mean * scale``
    (``weight``/``bias`` None: 1 and 0), in PyTorch ops (:func:`densenet_fast.bn_math.coefficients`)."""
    coefficients(mean, invstd, weight, bias, coefs)


def stats_result(mean: Tensor, var: Tensor, stats_into: Optional[StatsOut], produced: Tensor):
    """An op's returned statistics of the tensor it ``produced``: ``(mean, var)``, or ``(None,
    None)`` once written into ``stats_into``."""
    if stats_into is None:
        return mean, var
    write_stats(stats_into, mean, var, produced.numel() // max(1, produced.shape[1]))
    return None, None


class Unsupported(NamedTuple):
    """Why a backend can't compute on some tensors: the message, and the error it is raised as."""

    message: str
    error: type[Exception] = RuntimeError

    def __str__(self) -> str:
        return self.message


class Backend(ABC):
    """Base class of the backends. Subclasses implement every method below."""

    name: str = "abstract"

    @abstractmethod
    def supports(self, x: Tensor) -> Optional[Unsupported]:
        """None if this backend computes on tensors like ``x`` (device, dtype), else why not."""

    def check_tensors(self, x: Tensor) -> None:
        """Raise :meth:`supports`'s reason as its error, if there is one."""
        reason = self.supports(x)
        if reason is not None:
            raise reason.error(reason.message)

    @abstractmethod
    def channel_stats(self, x: Tensor, stats_into: Optional[StatsOut] = None, out: Optional[Tensor] = None
                      ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Per-channel mean and biased variance of ``x`` over N, H, W, in the statistics dtype; with
        ``stats_into`` written there with what follows (:class:`StatsOut`), and (None, None) returned.
        With ``out`` (x's shape and dtype: the stage buffer's first channels) ``x`` is also copied
        there; a backend that can does it while it reads ``x`` for the statistics."""

    @abstractmethod
    def bn_relu_conv1x1(
        self, x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, with_stats: bool,
        stats_into: Optional[StatsOut] = None,
        coefs_from: Optional[CoefsFrom] = None,
    ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """``conv1x1(relu(x * scale + shift), weight)``: the bottleneck, a new tensor, NCHW or
        channels_last (the backend's choice: the layout its own conv3x3 ops read best).

        With ``with_stats`` also returns the bottleneck's per-channel mean and biased variance,
        else ``(z, None, None)``; with ``stats_into`` (and ``with_stats``) writes them there
        instead (see :class:`StatsOut`) and returns ``(z, None, None)``. With ``coefs_from``
        ``scale`` and ``shift`` are computed first (see :class:`CoefsFrom`).
        """

    @abstractmethod
    def bn_relu_conv3x3(self, z: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, out: Tensor,
                        noise: Optional[Tensor], with_stats: bool, stats_into: Optional[StatsOut] = None
                        ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Write ``conv3x3(relu(z * scale + shift), weight, padding=1) * noise`` into ``out``.

        ``out`` is the layer's channel slice of the feature buffer; ``noise`` is dropout's scaled
        mask (or None). With ``with_stats`` returns the written channels' mean and biased variance,
        or with ``stats_into`` writes them there (see :class:`StatsOut`) and returns ``(None, None)``.
        """

    @abstractmethod
    def bn_relu_conv1x1_backward(self, grad_out: Tensor, x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor,
                                 center: Tensor, grad_x: Tensor, accumulate: bool, need_weight_grad: bool,
                                 coef_sums: Optional[CoefSums] = None) -> ConvGrads:
        """Backward of :meth:`bn_relu_conv1x1` (the ReLU mask is recomputed from ``x``): ``scale * dy``
        into ``grad_x`` (added with ``accumulate``, see the module docstring), the weight gradient
        when ``need_weight_grad``; with ``coef_sums`` it also adds its BN's batch-statistics terms
        there (see :class:`CoefSums`)."""

    @abstractmethod
    def bn_relu_conv3x3_backward(self, grad_out: Tensor, z: Tensor, scale: Tensor, shift: Tensor, weight: Tensor,
                                 center: Tensor, grad_x: Tensor, accumulate: bool, need_weight_grad: bool
                                 ) -> ConvGrads:
        """Backward of :meth:`bn_relu_conv3x3`; ``grad_out`` already carries dropout's mask.
        ``grad_x``, ``accumulate``: as in :meth:`bn_relu_conv1x1_backward`."""

    @abstractmethod
    def bn_relu_pool_conv1x1(self, x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor,
                             coefs_from: Optional[CoefsFrom] = None) -> Tensor:
        """The transition: ``conv1x1(avg_pool2x2(relu(x * scale + shift)), weight)``.

        Pooling before the conv is the same math as torchvision's conv-then-pool (both are linear
        and the conv is pointwise) at a quarter of the FLOPs. ``coefs_from``: as in :meth:`bn_relu_conv1x1`.
        """

    @abstractmethod
    def bn_relu_pool_conv1x1_backward(self, grad_out: Tensor, x: Tensor, scale: Tensor, shift: Tensor,
                                      weight: Tensor, center: Tensor, grad_x: Tensor, accumulate: bool,
                                      need_weight_grad: bool, coef_sums: Optional[CoefSums] = None) -> ConvGrads:
        """Backward of :meth:`bn_relu_pool_conv1x1`; ``grad_x``, ``accumulate`` and ``coef_sums`` as in
        :meth:`bn_relu_conv1x1_backward` (the last row/column of an odd-sized map gets no gradient)."""

    @abstractmethod
    def bn_grad_finalize(self, grad_x: Tensor, x: Tensor, center: Tensor, coef_x: Tensor, coef_c: Tensor,
                         factors: Optional[tuple[Tensor, Tensor]] = None) -> None:
        """In place: ``grad_x += coef_x * (x - center) + coef_c`` (per-channel coefficients).

        This is the part of BN's backward that goes through the batch statistics, summed over
        every BN that normalized these channels, applied once per channel. With ``factors``
        ``(fx, fc)`` the coefficients are ``fx * coef_x`` and ``fc * coef_c`` (a BN's factors
        times its reductions, see stage_algorithm's docstring).
        """

    def bottleneck_memory_format(self, dtype: torch.dtype, channels: int) -> torch.memory_format:
        """The layout of the bottlenecks :meth:`bn_relu_conv1x1` returns for activations of ``dtype``
        and ``channels`` outputs: a rule of those alone, which the stage's fake implementation states
        for the bottlenecks it keeps (torch.compile checks the strides). NCHW unless a backend says
        otherwise."""
        return torch.contiguous_format

    def bn_coefficients(self, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        coefs: Tensor) -> None:
        """A BN's coefficients into the (2, C) ``coefs``: see :func:`write_coefficients`, which
        this default runs; a backend may do it in one launch."""
        write_coefficients(mean, invstd, weight, bias, coefs)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and accumulations stay in float32 for half-precision activations."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def memory_format(x: Tensor) -> torch.memory_format:
    """channels_last for a tensor laid out channels_last (and not also plain contiguous), else contiguous:
    ATen's rule for a whole tensor (suggest_memory_format, what torchvision's outputs follow). The
    compiled kernels' rule for views of a buffer, where a channel slice keeps its buffer's layout, is
    extension_ops.kernel_memory_format."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
