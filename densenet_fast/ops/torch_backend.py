"""The ``torch`` backend: the op interface in portable PyTorch (any device, any float dtype).

The prefix's BN-ReLU is recomputed a chunk of images at a time, so the normalized activations that
exist at once are bounded by a chunk. In an NCHW buffer one image's channel prefix is contiguous,
which lets ATen's vectorized batch-norm kernels run on it; images are grouped only where one image
is too small for that to matter.

Each elementwise step is one ATen kernel chosen for the fewest passes over memory:
``batch_norm`` in inference form computes ``x * scale + shift`` (running mean 0, variance 1, eps 0),
``threshold_backward`` applies the ReLU mask, and ``native_batch_norm_backward`` in inference form
gives ``sum(dy)`` and ``sum(dy * (x - center))`` in one pass.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .interface import Backend, ConvGrads, stats_dtype

# Below this many elements per image, images are processed in groups to amortize launch overhead.
_MIN_CHUNK_ELEMENTS = 1 << 18


def _chunks(x: Tensor) -> Iterator[slice]:
    per_image = max(1, x[0].numel())
    step = max(1, _MIN_CHUNK_ELEMENTS // per_image)
    for start in range(0, x.shape[0], step):
        yield slice(start, min(start + step, x.shape[0]))


def _bn_relu(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """relu(x * scale + shift) for one chunk, as a new tensor in x's dtype."""
    c = x.shape[1]
    zeros = torch.zeros(c, dtype=scale.dtype, device=x.device)
    ones = torch.ones(c, dtype=scale.dtype, device=x.device)
    y = F.batch_norm(x, zeros, ones, scale, shift, False, 0.0, 0.0)
    return y.relu_()


def _bn_sums(dy: Tensor, x: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
    """(sum(dy * (x - center)), sum(dy)) per channel, in one pass."""
    ones = torch.ones(x.shape[1], dtype=center.dtype, device=x.device)
    _, sum_dy_xc, sum_dy = torch.ops.aten.native_batch_norm_backward(
        dy, x, ones, center, ones, None, None, False, 0.0, [False, True, True]
    )
    return sum_dy_xc, sum_dy


def _add_or_write(dst: Tensor, dy: Tensor, scale4: Tensor, accumulate: bool) -> None:
    if accumulate:
        dst.addcmul_(dy, scale4)
    else:
        torch.mul(dy, scale4, out=dst)


def _conv_backward(grad_out: Tensor, y: Tensor, weight: Tensor, padding: int, need_weight_grad: bool):
    grad_y, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_out, y, weight, None, [1, 1], [padding, padding], [1, 1], False, [0, 0], 1,
        [True, need_weight_grad, False],
    )
    return grad_y, grad_w


class TorchBackend(Backend):
    name = "torch"

    def check_tensors(self, x: Tensor) -> None:
        if not x.is_floating_point():
            raise TypeError(f"backend 'torch' expects floating-point tensors, got {x.dtype}")

    def channel_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        var, mean = torch.var_mean(x.to(stats_dtype(x.dtype)), dim=(0, 2, 3), correction=0)
        return mean, var

    def bn_relu_conv1x1(self, x, scale, shift, weight, with_stats):
        z = x.new_empty((x.shape[0], weight.shape[0]) + x.shape[2:])
        for s in _chunks(x):
            z[s] = F.conv2d(_bn_relu(x[s], scale, shift), weight)
        if not with_stats:
            return z, None, None
        mean, var = self.channel_stats(z)
        return z, mean, var

    def bn_relu_conv3x3(self, z, scale, shift, weight, out, noise, with_stats):
        f = z.new_empty((z.shape[0], weight.shape[0]) + z.shape[2:])
        for s in _chunks(z):
            f[s] = F.conv2d(_bn_relu(z[s], scale, shift), weight, padding=1)
        if noise is not None:
            f.mul_(noise)
        out.copy_(f)
        if not with_stats:
            return None, None
        # Statistics of the new channels while they are contiguous, before they sit in the buffer.
        return self.channel_stats(f)

    def _bn_relu_conv_backward(self, grad_out, x, scale, shift, weight, center, grad_x, need_weight_grad, padding):
        accumulate = grad_x is not None
        if grad_x is None:
            grad_x = torch.empty_like(x)
        grad_w = None
        sum_dy = torch.zeros_like(center)
        sum_dy_xc = torch.zeros_like(center)
        scale4 = scale.to(x.dtype)[:, None, None]
        for s in _chunks(x):
            y = _bn_relu(x[s], scale, shift)
            dy, gw = _conv_backward(grad_out[s], y, weight, padding, need_weight_grad)
            if need_weight_grad:
                grad_w = gw if grad_w is None else grad_w.add_(gw)
            torch.ops.aten.threshold_backward.grad_input(dy, y, 0, grad_input=dy)
            del y
            s_xc, s_dy = _bn_sums(dy, x[s], center)
            sum_dy_xc += s_xc
            sum_dy += s_dy
            _add_or_write(grad_x[s], dy, scale4, accumulate)
        return ConvGrads(grad_x, grad_w, sum_dy, sum_dy_xc)

    def bn_relu_conv1x1_backward(self, grad_out, x, scale, shift, weight, center, grad_x, need_weight_grad):
        return self._bn_relu_conv_backward(grad_out, x, scale, shift, weight, center, grad_x, need_weight_grad, 0)

    def bn_relu_conv3x3_backward(self, grad_out, z, scale, shift, weight, center, grad_x, need_weight_grad):
        return self._bn_relu_conv_backward(grad_out, z, scale, shift, weight, center, grad_x, need_weight_grad, 1)

    def bn_relu_pool_conv1x1(self, x, scale, shift, weight):
        n, _, h, w = x.shape
        out = x.new_empty((n, weight.shape[0], h // 2, w // 2))
        for s in _chunks(x):
            out[s] = F.conv2d(F.avg_pool2d(_bn_relu(x[s], scale, shift), 2), weight)
        return out

    def bn_relu_pool_conv1x1_backward(self, grad_out, x, scale, shift, weight, center, grad_x, need_weight_grad):
        accumulate = grad_x is not None
        if grad_x is None:
            grad_x = torch.empty_like(x)
        grad_w = None
        sum_dy = torch.zeros_like(center)
        sum_dy_xc = torch.zeros_like(center)
        scale4 = scale.to(x.dtype)[:, None, None]
        for s in _chunks(x):
            y = _bn_relu(x[s], scale, shift)
            pooled = F.avg_pool2d(y, 2)
            d_pooled, gw = _conv_backward(grad_out[s], pooled, weight, 0, need_weight_grad)
            del pooled
            if need_weight_grad:
                grad_w = gw if grad_w is None else grad_w.add_(gw)
            dy = torch.ops.aten.avg_pool2d_backward(d_pooled, y, [2, 2], [2, 2], [0, 0], False, True, None)
            torch.ops.aten.threshold_backward.grad_input(dy, y, 0, grad_input=dy)
            del y
            s_xc, s_dy = _bn_sums(dy, x[s], center)
            sum_dy_xc += s_xc
            sum_dy += s_dy
            _add_or_write(grad_x[s], dy, scale4, accumulate)
        return ConvGrads(grad_x, grad_w, sum_dy, sum_dy_xc)

    def bn_grad_finalize(self, grad_x, x, center, coef_x, coef_c):
        dt = x.dtype
        for s in _chunks(x):
            xc = torch.sub(x[s], center.to(dt)[:, None, None])
            grad_x[s].addcmul_(xc, coef_x.to(dt)[:, None, None]).add_(coef_c.to(dt)[:, None, None])
