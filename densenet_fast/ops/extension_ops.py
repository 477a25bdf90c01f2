"""The compiled extension's ops, ``torch.ops.densenet_fast`` (csrc/), as the backends built on it see them.

Importing this module loads ``densenet_fast._C`` (:func:`densenet_fast._extension.load_extension`:
ImportError when it is not built, or was built for another torch) and registers the fake (meta)
implementations of its ops, so torch.compile can trace them; both happen once, for the two
backends on the extension: ``cpp`` (cpp_backend.py, the fused CPU ops) and ``composite``
(composite_backend.py, the per-channel kernels around ATen's convolutions).

Backward ops take the caller's accumulator ``grad_x`` and an ``accumulate`` flag (interface.py)
and return (grad_weight or an empty tensor, sum_dy, sum_dy_xc); ``bn_relu_backward`` returns the
two sums.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._extension import load_extension
from .interface import stats_dtype

# Registers torch.ops.densenet_fast. ImportError (the registry then reports the backends on the
# extension unavailable, with this reason) when the library is not built, or was built for another
# torch: then it is not even loaded, since a mismatched library can crash the process.
load_extension()

ops = torch.ops.densenet_fast


def built_with_cuda() -> bool:
    """Whether the extension's CUDA kernels were compiled in (nvcc present at build time)."""
    return bool(ops.built_with_cuda())


def walkable(t: Tensor) -> Tensor:
    """``t`` when the kernels can walk it (NCHW or channels_last), else a contiguous copy."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def kernel_memory_format(x: Tensor) -> torch.memory_format:
    """The kernels' rule (csrc/checks.h): channels_last when the pixels are not the contiguous axis."""
    h, w = x.shape[2], x.shape[3]
    pixel_stride = x.stride(3) if w > 1 else (x.stride(2) if h > 1 else 1)
    return torch.channels_last if pixel_stride != 1 else torch.contiguous_format


# ---- fake implementations (shapes, dtypes, layouts only) ---------------------------------------


def _stats_pair(x: Tensor) -> tuple[Tensor, Tensor]:
    sdt = stats_dtype(x.dtype)
    return x.new_empty(x.shape[1], dtype=sdt), x.new_empty(x.shape[1], dtype=sdt)


def _nothing(x: Tensor) -> Tensor:
    return x.new_empty(0)


def _new_like(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=kernel_memory_format(x))


@torch.library.register_fake("densenet_fast::channel_stats")
def _channel_stats_fake(x):
    return _stats_pair(x)


@torch.library.register_fake("densenet_fast::affine_relu")
def _affine_relu_fake(x, scale, shift):
    return _new_like(x)


@torch.library.register_fake("densenet_fast::bn_relu_backward")
def _bn_relu_backward_fake(grad_y, x, scale, shift, center, grad_x, accumulate):
    return _stats_pair(x)


@torch.library.register_fake("densenet_fast::bn_grad_finalize")
def _bn_grad_finalize_fake(grad_x, x, center, coef_x, coef_c):
    return None


@torch.library.register_fake("densenet_fast::bn_coefficients")
def _bn_coefficients_fake(mean, invstd, weight, bias, coefs):
    return None


@torch.library.register_fake("densenet_fast::write_stats")
def _write_stats_fake(stats, mean, var, count, eps, weight, bias, coefs):
    return None


# csrc/fused_cpu.cpp's bottleneck_format: z is channels_last for float32 with at least this many
# output channels (kChannelsLastMinOutChannels there), else NCHW.
_CHANNELS_LAST_BOTTLENECK_MIN_CHANNELS = 64


def bottleneck_memory_format(dtype: torch.dtype, channels: int) -> torch.memory_format:
    """The layout of the fused conv1x1's output (csrc's bottleneck_format), for its fake and the stage's."""
    if dtype == torch.float32 and channels >= _CHANNELS_LAST_BOTTLENECK_MIN_CHANNELS:
        return torch.channels_last
    return torch.contiguous_format


@torch.library.register_fake("densenet_fast::bn_relu_conv1x1")
def _bn_relu_conv1x1_fake(x, scale, shift, weight, with_stats):
    z = torch.empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]), dtype=x.dtype, device=x.device,
                    memory_format=bottleneck_memory_format(x.dtype, weight.shape[0]))
    if not with_stats:
        return z, _nothing(x), _nothing(x)
    return z, *_stats_pair(z)


@torch.library.register_fake("densenet_fast::bn_relu_conv3x3")
def _bn_relu_conv3x3_fake(z, scale, shift, weight, out, noise, with_stats):
    return _stats_pair(out) if with_stats else (_nothing(z), _nothing(z))


def _layer_backward_fake(grad_out, x, scale, shift, weight, center, grad_x, accumulate, need_weight_grad):
    # The fused ops are CPU float32/float64 only: the weight's dtype is the statistics dtype.
    grad_weight = x.new_empty(weight.shape, dtype=stats_dtype(x.dtype)) if need_weight_grad else _nothing(x)
    return grad_weight, *_stats_pair(x)


for _name in ("bn_relu_conv1x1_backward", "bn_relu_conv3x3_backward", "bn_relu_pool_conv1x1_backward"):
    torch.library.register_fake(f"densenet_fast::{_name}")(_layer_backward_fake)


@torch.library.register_fake("densenet_fast::bn_relu_pool_conv1x1")
def _bn_relu_pool_conv1x1_fake(x, scale, shift, weight):
    shape = (x.shape[0], weight.shape[0], x.shape[2] // 2, x.shape[3] // 2)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=kernel_memory_format(x))
