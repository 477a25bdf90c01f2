"""The ``composite`` backend: the extension's per-channel kernels around ATen's convolutions.

Why it exists: CUDA without Triton (no ``triton`` package, or a GPU Triton doesn't support), with
the convolutions in cuDNN. The per-channel work runs in the kernels of ``densenet_fast._C``
(csrc/, see extension_ops.py): statistics, ``relu(x * scale + shift)``, the fused BN-ReLU
backward (mask, both reductions, the write or accumulation into the gradient buffer) and the
batch-statistics term; the convolutions run in ATen, a chunk of images at a time. The code is
device-generic, so it runs on CPU too (float32, float64) over the CPU builds of the same kernels,
which is how the tests exercise it on a machine without a GPU; on CPU it is only used when pinned
(the fused ``cpp`` backend is faster there).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .aten_conv import conv_backward, weight_grad_accumulator
from .extension_ops import built_with_cuda, kernel_memory_format, ops, walkable
from .interface import Backend, ConvGrads, Unsupported, add_coef_sums, coefficients_first, stats_result

# The normalized activations are recomputed a chunk of images at a time: up to a quarter of the
# tensor the input belongs to (for a prefix, the block's feature buffer), and at least
# _MIN_CHUNK_ELEMENTS. The temporaries (the normalized chunk and its conv's outputs) then add at
# most a quarter of one buffer to a stage that holds the buffer and its gradient, and an op runs
# in about four chunks (with 2M-element chunks, block 1 of DenseNet-121 at batch 64, 224², took
# 32 per op: 32-64 launches).
_MIN_CHUNK_ELEMENTS = 1 << 22
_CHUNK_SHARE = 4
_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _chunks(x: Tensor) -> Iterator[slice]:
    per_image = max(1, x[0].numel())
    whole = x.shape[0] * max(x.stride(0), per_image)  # the buffer a channel slice belongs to
    step = max(1, max(_MIN_CHUNK_ELEMENTS, whole // _CHUNK_SHARE) // per_image)
    for start in range(0, x.shape[0], step):
        yield slice(start, min(start + step, x.shape[0]))


class CompositeBackend(Backend):
    name = "composite"

    def supports(self, x: Tensor) -> Optional[Unsupported]:
        if x.device.type == "cpu":
            if x.dtype not in _CPU_DTYPES:
                return Unsupported(f"backend 'composite' on CPU expects float32 or float64 tensors, got {x.dtype}",
                                   TypeError)
        elif x.device.type == "cuda":
            if not built_with_cuda():
                return Unsupported("backend 'composite' can't run on CUDA tensors: densenet_fast._C was built "
                                   "without its CUDA kernels (reinstall with nvcc present, or DENSENET_FAST_CUDA=1)")
            if x.dtype not in _CUDA_DTYPES:
                return Unsupported(f"backend 'composite' on CUDA expects float16, bfloat16, float32 or float64 "
                                   f"tensors, got {x.dtype}", TypeError)
        else:
            return Unsupported(f"backend 'composite' runs on CPU and CUDA tensors, got a {x.device.type} tensor")
        return None

    def channel_stats(self, x, stats_into=None, out=None):
        if out is not None:
            out.copy_(x)
        return stats_result(*ops.channel_stats(walkable(x) if x.dim() == 4 else x), stats_into, x)

    def bn_relu_conv1x1(self, x, scale, shift, weight, with_stats, stats_into=None, coefs_from=None):
        coefficients_first(self, coefs_from)
        z = torch.empty((x.shape[0], weight.shape[0]) + x.shape[2:], dtype=x.dtype, device=x.device)
        for s in _chunks(x):
            z[s] = F.conv2d(ops.affine_relu(x[s], scale, shift), weight)
        if not with_stats:
            return z, None, None
        return (z, *stats_result(*ops.channel_stats(z), stats_into, z))

    def bn_relu_conv3x3(self, z, scale, shift, weight, out, noise, with_stats, stats_into=None):
        parts = [F.conv2d(ops.affine_relu(z[s], scale, shift), weight, padding=1) for s in _chunks(z)]
        f = parts[0] if len(parts) == 1 else torch.cat(parts)
        del parts
        if noise is not None:
            f.mul_(noise)
        out.copy_(f)
        # Statistics of the new channels while they are contiguous, before they sit in the buffer.
        return stats_result(*ops.channel_stats(f), stats_into, out) if with_stats else (None, None)

    @staticmethod
    def _finish(dy: Tensor, x: Tensor, scale, shift, center, grad_x: Tensor, accumulate: bool, s: slice, sums):
        """The chunk ``s``'s BN-ReLU backward: ``grad_x[s]`` gets (or gains) ``scale * dy``."""
        sum_dy, sum_dy_xc = ops.bn_relu_backward(dy, x[s], scale, shift, center, grad_x[s], accumulate)
        sums[0] += sum_dy
        sums[1] += sum_dy_xc

    def _conv_backward(self, grad_out, x, scale, shift, weight, center, grad_x, accumulate, need_weight_grad,
                       padding: int) -> ConvGrads:
        """Both 1x1 and 3x3 convs' backward, a chunk of images at a time: the conv's input gradient
        exists for one chunk beside grad_x, not for the whole batch; the activations are recomputed
        only for the weight gradient (the input gradient needs none)."""
        grad_w = weight_grad_accumulator(weight) if need_weight_grad else None
        sums = [torch.zeros_like(center), torch.zeros_like(center)]
        for s in _chunks(x):
            y = ops.affine_relu(x[s], scale, shift) if need_weight_grad else x[s]
            dy, gw = conv_backward(grad_out[s], y, weight, padding, need_weight_grad)
            del y
            if grad_w is not None:
                grad_w += gw
            self._finish(walkable(dy), x, scale, shift, center, grad_x, accumulate, s, sums)
        return ConvGrads(grad_w, sums[0], sums[1])

    def bn_relu_conv1x1_backward(self, grad_out, x, scale, shift, weight, center, grad_x, accumulate,
                                 need_weight_grad, coef_sums=None):
        return add_coef_sums(coef_sums, self._conv_backward(grad_out, x, scale, shift, weight, center, grad_x,
                                                            accumulate, need_weight_grad, padding=0))

    def bn_relu_conv3x3_backward(self, grad_out, z, scale, shift, weight, center, grad_x, accumulate,
                                 need_weight_grad):
        return self._conv_backward(grad_out, z, scale, shift, weight, center, grad_x, accumulate, need_weight_grad,
                                   padding=1)

    def bn_relu_pool_conv1x1(self, x, scale, shift, weight, coefs_from=None):
        coefficients_first(self, coefs_from)
        n, _, h, w = x.shape
        out = torch.empty((n, weight.shape[0], h // 2, w // 2), dtype=x.dtype, device=x.device,
                          memory_format=kernel_memory_format(x))
        for s in _chunks(x):
            out[s] = F.conv2d(F.avg_pool2d(ops.affine_relu(x[s], scale, shift), 2), weight)
        return out

    def bn_relu_pool_conv1x1_backward(self, grad_out, x, scale, shift, weight, center, grad_x, accumulate,
                                      need_weight_grad, coef_sums=None):
        grad_w = weight_grad_accumulator(weight) if need_weight_grad else None
        sums = [torch.zeros_like(center), torch.zeros_like(center)]
        for s in _chunks(x):
            y = ops.affine_relu(x[s], scale, shift)
            pooled = F.avg_pool2d(y, 2)
            d_pooled, gw = conv_backward(grad_out[s], pooled, weight, 0, need_weight_grad)
            del pooled
            if grad_w is not None:
                grad_w += gw
            # avg_pool2d's backward gives the last row/column of an odd-sized map a zero gradient,
            # so every element of grad_x[s] is written (or accumulated) below.
            dy = torch.ops.aten.avg_pool2d_backward(d_pooled, y, [2, 2], [2, 2], [0, 0], False, True, None)
            del y, d_pooled
            self._finish(walkable(dy), x, scale, shift, center, grad_x, accumulate, s, sums)
        return add_coef_sums(coef_sums, ConvGrads(grad_w, sums[0], sums[1]))

    def bn_grad_finalize(self, grad_x, x, center, coef_x, coef_c, factors=None):
        if factors is not None:
            coef_x, coef_c = torch._foreach_mul(list(factors), [coef_x, coef_c])
        ops.bn_grad_finalize(grad_x, x, center, coef_x, coef_c)
