"""The ``torch`` backend: the op interface in portable PyTorch (any device, any float dtype).

The prefix's BN-ReLU is recomputed a chunk of images at a time, so the normalized activations that
exist at once are bounded by a chunk. In an NCHW buffer one image's channel prefix is contiguous,
which keeps ATen's vectorized batch-norm kernels on their fast path, so a prefix view is walked one
image at a time; contiguous tensors (bottlenecks, whole buffers) go in larger chunks.

Each elementwise step is one ATen kernel chosen for the fewest passes over memory:
``batch_norm`` in inference form computes ``x * scale + shift`` (running mean 0, variance 1, eps 0),
``threshold_backward`` applies the ReLU mask, ``native_batch_norm_backward`` in inference form gives
``sum(dy)`` and ``sum(dy * (x - center))`` in one pass (half ``dy`` apart: float32 sums), and
``batch_norm_update_stats`` gives a tensor's channel statistics. 1x1 convolutions are plain GEMMs
over each image's (C, H*W) matrix.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .aten_conv import conv_backward, weight_grad_accumulator
from .interface import (
    Backend,
    ConvGrads,
    StatsOut,
    Unsupported,
    add_coef_sums,
    coefficients_first,
    memory_format,
    stats_dtype,
    stats_result,
)

# Largest chunk, in elements, of normalized activations recomputed at once (8 MiB in float32).
_CHUNK_ELEMENTS = 1 << 21
# A non-contiguous prefix is walked image by image unless an image is smaller than this.
_SMALL_IMAGE_ELEMENTS = 1 << 16


def _chunks(x: Tensor) -> Iterator[slice]:
    per_image = max(1, x.numel() // max(1, x.shape[0]))
    if x.is_contiguous() or per_image < _SMALL_IMAGE_ELEMENTS:
        step = max(1, _CHUNK_ELEMENTS // per_image)
    else:
        step = 1
    for start in range(0, x.shape[0], step):
        yield slice(start, min(start + step, x.shape[0]))


class _Affine:
    """relu(x * scale + shift) for chunks of one tensor, through batch_norm's inference kernel."""

    def __init__(self, scale: Tensor, shift: Tensor):
        self.scale, self.shift = scale, shift
        self.zeros = torch.zeros_like(scale)
        self.ones = torch.ones_like(scale)
        # In the statistics dtype: a half-precision dy times it is computed in float32 and rounded
        # once, into grad_x (rounding the scale to half first was a second rounding, up to 3.6x
        # PyTorch's own bfloat16 error).
        self.scale4 = scale[:, None, None]

    def relu(self, x: Tensor) -> Tensor:
        # ATen's op: F.batch_norm refuses eps=0 in some torch releases (2.11), and eps=0 with unit
        # variance is what makes it exactly x * scale + shift.
        return torch.batch_norm(x, self.scale, self.shift, self.zeros, self.ones, False, 0.0, 0.0,
                                torch.backends.cudnn.enabled).relu_()


def _as_matrices(t: Tensor) -> Tensor:
    """(n, c, h, w) -> (n, c, h*w) view; the caller guarantees contiguity."""
    return t.view(t.shape[0], t.shape[1], -1)


def _conv1x1(y: Tensor, weight: Tensor, out: Tensor) -> None:
    if y.is_contiguous() and out.is_contiguous():
        torch.matmul(weight.view(weight.shape[0], -1), _as_matrices(y), out=_as_matrices(out))
    else:
        out.copy_(F.conv2d(y, weight))


def _conv1x1_backward(grad_out: Tensor, y: Tensor, weight: Tensor, grad_w: Optional[Tensor]) -> Tensor:
    """Input gradient of a 1x1 conv; adds the weight gradient into ``grad_w`` when given."""
    if y.is_contiguous() and grad_out.is_contiguous():
        w2d = weight.view(weight.shape[0], -1)
        go = _as_matrices(grad_out)
        if grad_w is not None:
            g2d = grad_w.view(w2d.shape)
            for go_i, y_i in zip(go, _as_matrices(y)):
                if g2d.dtype == go_i.dtype:
                    g2d.addmm_(go_i, y_i.t())
                else:  # half-precision activations: the sum over images stays in float32
                    g2d += torch.mm(go_i, y_i.t())
        return torch.matmul(w2d.t(), go).view(y.shape)
    grad_y, gw = conv_backward(grad_out, y, weight, 0, grad_w is not None)
    if grad_w is not None:
        grad_w.add_(gw)
    return grad_y


def _into(grad_x: Tensor, dy: Tensor, scale4: Tensor, accumulate: bool) -> None:
    """``grad_x = scale * dy``, or with ``accumulate`` ``grad_x += scale * dy``, in the dtype of the
    two factors' promotion (float32 for half ``dy``), rounded once into ``grad_x`` (on CPU through a
    float32 temporary of the chunk)."""
    if accumulate:
        grad_x.addcmul_(dy, scale4)
    else:
        torch.mul(dy, scale4, out=grad_x)


def _finish_dy(dy: Tensor, y: Tensor, x: Tensor, center: Tensor, ones: Tensor, sums: list[Tensor]) -> None:
    """Mask ``dy`` by the ReLU in place and add its BN reductions into ``sums``."""
    torch.ops.aten.threshold_backward.grad_input(dy, y, 0, grad_input=dy)
    if dy.dtype in (torch.float16, torch.bfloat16):
        # ATen's CPU native_batch_norm_backward sums half dy in half where x is a channel slice
        # (measured: sum(dy) 0.06 off over 175 bfloat16 values), so the sums are taken in float32,
        # on every device (CUDA's kernel was not measured): one float32 temporary of a chunk.
        sums[0] += dy.sum((0, 2, 3), dtype=center.dtype)
        term = x - center[:, None, None]  # float32: center is in the statistics dtype
        sums[1] += term.mul_(dy).sum((0, 2, 3))
        return
    _, sum_dy_xc, sum_dy = torch.ops.aten.native_batch_norm_backward(
        dy, x, ones, center, ones, None, None, False, 0.0, [False, True, True])
    sums[0] += sum_dy
    sums[1] += sum_dy_xc


class TorchBackend(Backend):
    name = "torch"

    def supports(self, x: Tensor) -> Optional[Unsupported]:
        if not x.is_floating_point():
            return Unsupported(f"backend 'torch' expects floating-point tensors, got {x.dtype}", TypeError)
        return None

    def channel_stats(self, x: Tensor, stats_into: Optional[StatsOut] = None, out: Optional[Tensor] = None):
        if out is not None:
            out.copy_(x)
        xs = x.to(stats_dtype(x.dtype))
        # Two-pass per-channel mean and biased variance, without touching any running stats.
        return stats_result(*torch.ops.aten.batch_norm_update_stats(xs, None, None, 0.0), stats_into, x)

    def bn_relu_conv1x1(self, x, scale, shift, weight, with_stats, stats_into=None, coefs_from=None):
        coefficients_first(self, coefs_from)
        z = torch.empty((x.shape[0], weight.shape[0]) + x.shape[2:], dtype=x.dtype, device=x.device)
        affine = _Affine(scale, shift)
        for s in _chunks(x):
            _conv1x1(affine.relu(x[s]), weight, z[s])
        if not with_stats:
            return z, None, None
        return (z, *self.channel_stats(z, stats_into))

    def bn_relu_conv3x3(self, z, scale, shift, weight, out, noise, with_stats, stats_into=None):
        affine = _Affine(scale, shift)
        parts = [F.conv2d(affine.relu(z[s]), weight, padding=1) for s in _chunks(z)]
        if not parts:  # an empty batch
            parts = [z.new_empty((0, weight.shape[0]) + z.shape[2:])]
        f = parts[0] if len(parts) == 1 else torch.cat(parts)
        del parts
        if noise is not None:
            f.mul_(noise)
        out.copy_(f)
        # Statistics of the new channels while they are contiguous, before they sit in the buffer.
        return self.channel_stats(f, stats_into) if with_stats else (None, None)

    def _prologue_backward(self, x, scale, shift, weight, center, grad_x, accumulate, need_weight_grad, dy_of):
        """Shared by the 1x1 convs: ``dy_of(grad_out_chunk, y, grad_w)`` gives the chunk's BN-output grad."""
        affine = _Affine(scale, shift)
        grad_w = weight_grad_accumulator(weight) if need_weight_grad else None
        sums = [torch.zeros_like(center), torch.zeros_like(center)]
        for s in _chunks(x):
            y = affine.relu(x[s])
            dy = dy_of(s, y, grad_w)
            _finish_dy(dy, y, x[s], center, affine.ones, sums)
            del y
            _into(grad_x[s], dy, affine.scale4, accumulate)
        return ConvGrads(grad_w, sums[0], sums[1])

    def bn_relu_conv1x1_backward(self, grad_out, x, scale, shift, weight, center, grad_x, accumulate,
                                 need_weight_grad, coef_sums=None):
        def dy_of(s, y, grad_w):
            return _conv1x1_backward(grad_out[s], y, weight, grad_w)

        return add_coef_sums(coef_sums, self._prologue_backward(x, scale, shift, weight, center, grad_x, accumulate,
                                                                need_weight_grad, dy_of))

    def bn_relu_conv3x3_backward(self, grad_out, z, scale, shift, weight, center, grad_x, accumulate,
                                 need_weight_grad):
        affine = _Affine(scale, shift)
        grad_w = weight_grad_accumulator(weight) if need_weight_grad else None
        sums = [torch.zeros_like(center), torch.zeros_like(center)]
        # Both gradients a chunk of images at a time: the conv's input gradient exists for one
        # chunk beside grad_x, not for the whole batch.
        for s in _chunks(z):
            y = affine.relu(z[s])
            dy, gw = conv_backward(grad_out[s], y, weight, 1, need_weight_grad)
            if grad_w is not None:
                grad_w += gw
            _finish_dy(dy, y, z[s], center, affine.ones, sums)
            del y
            _into(grad_x[s], dy, affine.scale4, accumulate)
        return ConvGrads(grad_w, sums[0], sums[1])

    def bn_relu_pool_conv1x1(self, x, scale, shift, weight, coefs_from=None):
        coefficients_first(self, coefs_from)
        n, _, h, w = x.shape
        # The block's layout carries over to the next block (channels_last stays channels_last).
        out = torch.empty((n, weight.shape[0], h // 2, w // 2), dtype=x.dtype, device=x.device,
                          memory_format=memory_format(x))
        affine = _Affine(scale, shift)
        for s in _chunks(x):
            _conv1x1(F.avg_pool2d(affine.relu(x[s]), 2), weight, out[s])
        return out

    def bn_relu_pool_conv1x1_backward(self, grad_out, x, scale, shift, weight, center, grad_x, accumulate,
                                      need_weight_grad, coef_sums=None):
        def dy_of(s, y, grad_w):
            d_pooled = _conv1x1_backward(grad_out[s], F.avg_pool2d(y, 2), weight, grad_w)
            # The last row/column of an odd-sized map feeds no window: avg_pool2d_backward gives it
            # a zero gradient, so every element of grad_x is written.
            return torch.ops.aten.avg_pool2d_backward(d_pooled, y, [2, 2], [2, 2], [0, 0], False, True, None)

        return add_coef_sums(coef_sums, self._prologue_backward(x, scale, shift, weight, center, grad_x, accumulate,
                                                                need_weight_grad, dy_of))

    def bn_grad_finalize(self, grad_x, x, center, coef_x, coef_c, factors=None):
        if factors is not None:
            coef_x, coef_c = torch._foreach_mul(list(factors), [coef_x, coef_c])
        # In the statistics dtype (x - center promotes to it), rounded once into a half grad_x;
        # one temporary per chunk.
        center4, coef_x4, coef_c4 = (t[:, None, None] for t in (center, coef_x, coef_c))
        for s in _chunks(x):
            term = torch.sub(x[s], center4)
            torch.addcmul(coef_c4, term, coef_x4, out=term)
            grad_x[s].add_(term)
