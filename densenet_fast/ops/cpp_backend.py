"""The ``cpp`` backend: the op interface on the compiled extension ``densenet_fast._C`` (csrc/).

On CPU each interface method is one fused C++ op (``torch.ops.densenet_fast.*``): the BN-ReLU
prologue is recomputed tile by tile next to ATen's GEMMs, and the backward's ReLU mask, its two
reductions and the accumulation into the gradient buffer are one pass (float32 and float64).

On CUDA (when the extension was built with nvcc) the per-channel work runs in the extension's
CUDA kernels (statistics, relu(x * scale + shift), the fused BN-ReLU backward, the
batch-statistics term) and the convolutions in ATen, a chunk of images at a time
(``DeviceComposite`` below, which runs on CPU too so the tests exercise it there).

Fake implementations of every op are registered here, so torch.compile can trace them.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._extension import load_extension
from .interface import (
    Backend,
    ConvGrads,
    StatsOut,
    Unsupported,
    add_coef_sums,
    coefficients_first,
    stats_dtype,
    stats_result,
)

# Registers torch.ops.densenet_fast. ImportError (the registry then reports "cpp" unavailable, with
# this reason) when the library is not built, or was built for another torch: then it is not even
# loaded, since a mismatched library can crash the process.
load_extension()

_ops = torch.ops.densenet_fast

# The composite path recomputes the normalized activations a chunk of images at a time: up to a
# quarter of the tensor the input belongs to (for a prefix, the block's feature buffer), and at
# least _MIN_CHUNK_ELEMENTS. The temporaries (the normalized chunk and its conv's outputs) then add
# at most a quarter of one buffer to a stage that holds the buffer and its gradient, and an op runs
# in about four chunks (with 2M-element chunks, block 1 of DenseNet-121 at batch 64, 224², took
# 32 per op: 32-64 launches).
_MIN_CHUNK_ELEMENTS = 1 << 22
_CHUNK_SHARE = 4
_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def built_with_cuda() -> bool:
    """Whether the extension's CUDA kernels were compiled in (nvcc present at build time)."""
    return bool(_ops.built_with_cuda())


# ---- fake implementations (shapes, dtypes, layouts only) ---------------------------------------


def _stats_pair(x: Tensor) -> tuple[Tensor, Tensor]:
    sdt = stats_dtype(x.dtype)
    return x.new_empty(x.shape[1], dtype=sdt), x.new_empty(x.shape[1], dtype=sdt)


def _nothing(x: Tensor) -> Tensor:
    return x.new_empty(0)


def _memory_format(x: Tensor) -> torch.memory_format:
    # The kernels' rule (csrc/checks.h): channels_last when the pixels are not the contiguous axis.
    h, w = x.shape[2], x.shape[3]
    pixel_stride = x.stride(3) if w > 1 else (x.stride(2) if h > 1 else 1)
    return torch.channels_last if pixel_stride != 1 else torch.contiguous_format


def _new_like(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))


@torch.library.register_fake("densenet_fast::channel_stats")
def _channel_stats_fake(x):
    return _stats_pair(x)


@torch.library.register_fake("densenet_fast::affine_relu")
def _affine_relu_fake(x, scale, shift):
    return _new_like(x)


@torch.library.register_fake("densenet_fast::bn_relu_backward")
def _bn_relu_backward_fake(grad_y, x, scale, shift, center, grad_x):
    return (_new_like(x) if grad_x is None else _nothing(x)), *_stats_pair(x)


@torch.library.register_fake("densenet_fast::bn_grad_finalize")
def _bn_grad_finalize_fake(grad_x, x, center, coef_x, coef_c):
    return None


@torch.library.register_fake("densenet_fast::bn_coefficients")
def _bn_coefficients_fake(mean, invstd, weight, bias, coefs):
    return None


@torch.library.register_fake("densenet_fast::write_stats")
def _write_stats_fake(stats, mean, var, count, eps, weight, bias, coefs):
    return None


@torch.library.register_fake("densenet_fast::bn_relu_conv1x1")
def _bn_relu_conv1x1_fake(x, scale, shift, weight, with_stats):
    z = x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))
    if not with_stats:
        return z, _nothing(x), _nothing(x)
    return z, *_stats_pair(z)


@torch.library.register_fake("densenet_fast::bn_relu_conv3x3")
def _bn_relu_conv3x3_fake(z, scale, shift, weight, out, noise, with_stats):
    return _stats_pair(out) if with_stats else (_nothing(z), _nothing(z))


def _layer_backward_fake(grad_out, x, scale, shift, weight, center, grad_x, need_weight_grad):
    new_grad = _new_like(x) if grad_x is None else _nothing(x)
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight_grad else _nothing(x)
    return new_grad, grad_weight, *_stats_pair(x)


for _name in ("bn_relu_conv1x1_backward", "bn_relu_conv3x3_backward", "bn_relu_pool_conv1x1_backward"):
    torch.library.register_fake(f"densenet_fast::{_name}")(_layer_backward_fake)


@torch.library.register_fake("densenet_fast::bn_relu_pool_conv1x1")
def _bn_relu_pool_conv1x1_fake(x, scale, shift, weight):
    shape = (x.shape[0], weight.shape[0], x.shape[2] // 2, x.shape[3] // 2)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))


# ---- the backend -------------------------------------------------------------------------------


def _walkable(t: Tensor) -> Tensor:
    """``t`` when the kernels can walk it (NCHW or channels_last), else a contiguous copy."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def _chunks(x: Tensor) -> Iterator[slice]:
    per_image = max(1, x[0].numel())
    whole = x.shape[0] * max(x.stride(0), per_image)  # the buffer a channel slice belongs to
    step = max(1, max(_MIN_CHUNK_ELEMENTS, whole // _CHUNK_SHARE) // per_image)
    for start in range(0, x.shape[0], step):
        yield slice(start, min(start + step, x.shape[0]))


class DeviceComposite:
    """The interface from the extension's per-channel kernels plus ATen's convolutions.

    What the cpp backend runs on CUDA; device-generic, so on CPU it runs the same code over the
    CPU builds of the kernels.
    """

    def bn_relu_conv1x1(self, x, scale, shift, weight, with_stats):
        z = torch.empty((x.shape[0], weight.shape[0]) + x.shape[2:], dtype=x.dtype, device=x.device)
        for s in _chunks(x):
            z[s] = F.conv2d(_ops.affine_relu(x[s], scale, shift), weight)
        if not with_stats:
            return z, None, None
        return (z, *_ops.channel_stats(z))

    def bn_relu_conv3x3(self, z, scale, shift, weight, out, noise, with_stats):
        parts = [F.conv2d(_ops.affine_relu(z[s], scale, shift), weight, padding=1) for s in _chunks(z)]
        f = parts[0] if len(parts) == 1 else torch.cat(parts)
        del parts
        if noise is not None:
            f.mul_(noise)
        out.copy_(f)
        return tuple(_ops.channel_stats(f)) if with_stats else (None, None)

    @staticmethod
    def _finish(dy: Tensor, x: Tensor, scale, shift, center, grad_x: Optional[Tensor], out: Tensor, s: slice, sums):
        into = None if grad_x is None else grad_x[s]
        new, sum_dy, sum_dy_xc = _ops.bn_relu_backward(dy, x[s], scale, shift, center, into)
        if grad_x is None:
            out[s] = new
        sums[0] += sum_dy
        sums[1] += sum_dy_xc

    def bn_relu_conv1x1_backward(self, grad_out, x, scale, shift, weight, center, grad_x, need_weight_grad):
        grad_w = torch.zeros_like(weight) if need_weight_grad else None
        sums = [torch.zeros_like(center), torch.zeros_like(center)]
        out = _new_like(x) if grad_x is None else grad_x
        for s in _chunks(x):
            y = _ops.affine_relu(x[s], scale, shift)
            dy, gw, _ = torch.ops.aten.convolution_backward(
                grad_out[s], y, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, need_weight_grad, False])
            del y
            if grad_w is not None:
                grad_w += gw
            self._finish(dy, x, scale, shift, center, grad_x, out, s, sums)
        return ConvGrads(out, grad_w, sums[0], sums[1])

    def bn_relu_conv3x3_backward(self, grad_out, z, scale, shift, weight, center, grad_x, need_weight_grad):
        dy = torch.ops.aten.convolution_backward(
            grad_out, z, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False])[0]
        grad_w = torch.zeros_like(weight) if need_weight_grad else None
        if grad_w is not None:
            for s in _chunks(z):
                y = _ops.affine_relu(z[s], scale, shift)
                grad_w += torch.ops.aten.convolution_backward(
                    grad_out[s], y, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False])[1]
        new, sum_dy, sum_dy_xc = _ops.bn_relu_backward(_walkable(dy), z, scale, shift, center, grad_x)
        return ConvGrads(new if grad_x is None else grad_x, grad_w, sum_dy, sum_dy_xc)

    def bn_relu_pool_conv1x1(self, x, scale, shift, weight):
        n, _, h, w = x.shape
        out = torch.empty((n, weight.shape[0], h // 2, w // 2), dtype=x.dtype, device=x.device,
                          memory_format=_memory_format(x))
        for s in _chunks(x):
            out[s] = F.conv2d(F.avg_pool2d(_ops.affine_relu(x[s], scale, shift), 2), weight)
        return out

    def bn_relu_pool_conv1x1_backward(self, grad_out, x, scale, shift, weight, center, grad_x, need_weight_grad):
        grad_w = torch.zeros_like(weight) if need_weight_grad else None
        sums = [torch.zeros_like(center), torch.zeros_like(center)]
        out = _new_like(x) if grad_x is None else grad_x
        for s in _chunks(x):
            y = _ops.affine_relu(x[s], scale, shift)
            pooled = F.avg_pool2d(y, 2)
            d_pooled, gw, _ = torch.ops.aten.convolution_backward(
                grad_out[s], pooled, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                [True, need_weight_grad, False])
            del pooled
            if grad_w is not None:
                grad_w += gw
            dy = torch.ops.aten.avg_pool2d_backward(d_pooled, y, [2, 2], [2, 2], [0, 0], False, True, None)
            del y, d_pooled
            self._finish(_walkable(dy), x, scale, shift, center, grad_x, out, s, sums)
        return ConvGrads(out, grad_w, sums[0], sums[1])


class CppBackend(Backend):
    """``fused_cpu=False`` runs CPU tensors through :class:`DeviceComposite` (what CUDA runs)."""

    name = "cpp"

    def __init__(self, fused_cpu: bool = True):
        self.fused_cpu = fused_cpu
        self.composite = DeviceComposite()

    def supports(self, x: Tensor) -> Optional[Unsupported]:
        if x.device.type == "cpu":
            if x.dtype not in _CPU_DTYPES:
                return Unsupported(f"backend 'cpp' on CPU expects float32 or float64 tensors, got {x.dtype}", TypeError)
        elif x.device.type == "cuda":
            if not built_with_cuda():
                return Unsupported("backend 'cpp' can't run on CUDA tensors: densenet_fast._C was built without its "
                                   "CUDA kernels (reinstall with nvcc present, or DENSENET_FAST_CUDA=1)")
            if x.dtype not in _CUDA_DTYPES:
                return Unsupported(f"backend 'cpp' on CUDA expects float16, bfloat16, float32 or float64 tensors, "
                                   f"got {x.dtype}", TypeError)
        else:
            return Unsupported(f"backend 'cpp' runs on CPU and CUDA tensors, got a {x.device.type} tensor")
        return None

    def _fused(self, x: Tensor) -> bool:
        return self.fused_cpu and x.device.type == "cpu"

    def _stats_result(self, mean: Tensor, var: Tensor, stats_into: Optional[StatsOut], produced: Tensor):
        """interface.stats_result, with the rows written by one C++ op on CPU."""
        if stats_into is None or not self._fused(produced):
            return stats_result(mean, var, stats_into, produced)
        s = stats_into
        _ops.write_stats(s.stats, mean, var, produced.numel() // max(1, produced.shape[1]), s.eps, s.weight, s.bias,
                         s.coefs)
        return None, None

    def bn_coefficients(self, mean, invstd, weight, bias, coefs):
        if not self._fused(mean):
            return super().bn_coefficients(mean, invstd, weight, bias, coefs)
        _ops.bn_coefficients(mean, invstd, weight, bias, coefs)

    def channel_stats(self, x, stats_into=None, out=None):
        if out is not None:
            out.copy_(x)
        return self._stats_result(*_ops.channel_stats(_walkable(x) if x.dim() == 4 else x), stats_into, x)

    def bn_relu_conv1x1(self, x, scale, shift, weight, with_stats, stats_into=None, coefs_from=None):
        coefficients_first(self, coefs_from)
        if not self._fused(x):
            z, mean, var = self.composite.bn_relu_conv1x1(x, scale, shift, weight, with_stats)
        else:
            z, mean, var = _ops.bn_relu_conv1x1(x, scale, shift, weight, with_stats)
        return (z, *self._stats_result(mean, var, stats_into, z)) if with_stats else (z, None, None)

    def bn_relu_conv3x3(self, z, scale, shift, weight, out, noise, with_stats, stats_into=None):
        if not self._fused(z):
            mean, var = self.composite.bn_relu_conv3x3(z, scale, shift, weight, out, noise, with_stats)
        else:
            mean, var = _ops.bn_relu_conv3x3(z, scale, shift, weight, out, noise, with_stats)
        return self._stats_result(mean, var, stats_into, out) if with_stats else (None, None)

    @staticmethod
    def _grads(result, grad_x: Optional[Tensor], need_weight_grad: bool) -> ConvGrads:
        new_grad_x, grad_weight, sum_dy, sum_dy_xc = result
        return ConvGrads(new_grad_x if grad_x is None else grad_x, grad_weight if need_weight_grad else None,
                         sum_dy, sum_dy_xc)

    def bn_relu_conv1x1_backward(self, grad_out, x, scale, shift, weight, center, grad_x, need_weight_grad,
                                 coef_sums=None):
        if not self._fused(x):
            grads = self.composite.bn_relu_conv1x1_backward(
                grad_out, x, scale, shift, weight, center, grad_x, need_weight_grad)
        else:
            grads = self._grads(_ops.bn_relu_conv1x1_backward(
                _walkable(grad_out), x, scale, shift, weight, center, grad_x, need_weight_grad),
                grad_x, need_weight_grad)
        return add_coef_sums(coef_sums, grads)

    def bn_relu_conv3x3_backward(self, grad_out, z, scale, shift, weight, center, grad_x, need_weight_grad):
        if not self._fused(z):
            return self.composite.bn_relu_conv3x3_backward(
                grad_out, z, scale, shift, weight, center, grad_x, need_weight_grad)
        result = _ops.bn_relu_conv3x3_backward(
            _walkable(grad_out), z, scale, shift, weight, center, grad_x, need_weight_grad)
        return self._grads(result, grad_x, need_weight_grad)

    def bn_relu_pool_conv1x1(self, x, scale, shift, weight, coefs_from=None):
        coefficients_first(self, coefs_from)
        if not self._fused(x):
            return self.composite.bn_relu_pool_conv1x1(x, scale, shift, weight)
        return _ops.bn_relu_pool_conv1x1(x, scale, shift, weight)

    def bn_relu_pool_conv1x1_backward(self, grad_out, x, scale, shift, weight, center, grad_x, need_weight_grad,
                                      coef_sums=None):
        if not self._fused(x):
            grads = self.composite.bn_relu_pool_conv1x1_backward(
                grad_out, x, scale, shift, weight, center, grad_x, need_weight_grad)
        else:
            grads = self._grads(_ops.bn_relu_pool_conv1x1_backward(
                _walkable(grad_out), x, scale, shift, weight, center, grad_x, need_weight_grad),
                grad_x, need_weight_grad)
        return add_coef_sums(coef_sums, grads)

    def bn_grad_finalize(self, grad_x, x, center, coef_x, coef_c, factors=None):
        if factors is not None:
            coef_x, coef_c = torch._foreach_mul(list(factors), [coef_x, coef_c])
        _ops.bn_grad_finalize(grad_x, x, center, coef_x, coef_c)
