"""Fused Triton kernels of the op interface, one file per op: the kernel(s), a launcher registered
with ``torch.library.triton_op`` (so torch.compile can trace through it) and a ``*_ref`` PyTorch
reference beside it. ``common.py`` holds the tiling conventions and shared pieces."""
from .bn_coefficients import bn_coefficients, bn_coefficients_ref
from .bn_grad_finalize import bn_grad_finalize, bn_grad_finalize_ref
from .bn_relu_conv1x1 import bn_relu_conv1x1, bn_relu_conv1x1_ref
from .bn_relu_conv1x1_backward import bn_relu_conv1x1_backward, bn_relu_conv1x1_backward_ref
from .bn_relu_conv3x3 import bn_relu_conv3x3, bn_relu_conv3x3_ref
from .bn_relu_conv3x3_backward import bn_relu_conv3x3_backward, bn_relu_conv3x3_backward_ref
from .bn_relu_pool_conv1x1 import bn_relu_pool_conv1x1, bn_relu_pool_conv1x1_ref
from .bn_relu_pool_conv1x1_backward import bn_relu_pool_conv1x1_backward, bn_relu_pool_conv1x1_backward_ref
from .channel_stats import channel_stats, channel_stats_ref
from .common import SUPPORTED_DTYPES, interpreting

__all__ = [
    "bn_coefficients", "bn_coefficients_ref", "bn_grad_finalize", "bn_grad_finalize_ref",
    "bn_relu_conv1x1", "bn_relu_conv1x1_ref",
    "bn_relu_conv1x1_backward", "bn_relu_conv1x1_backward_ref", "bn_relu_conv3x3", "bn_relu_conv3x3_ref",
    "bn_relu_conv3x3_backward", "bn_relu_conv3x3_backward_ref", "bn_relu_pool_conv1x1", "bn_relu_pool_conv1x1_ref",
    "bn_relu_pool_conv1x1_backward", "bn_relu_pool_conv1x1_backward_ref", "channel_stats", "channel_stats_ref",
    "SUPPORTED_DTYPES", "interpreting",
]
