"""Fused Triton kernels of the op interface, one file per op: the kernel(s) and a launcher registered
with ``torch.library.triton_op`` (so torch.compile can trace through it); the ops' PyTorch references
are ``densenet_fast/ops/reference.py``. ``common.py`` holds the tiling conventions and shared pieces."""
from .bn_coefficients import bn_coefficients
from .bn_grad_finalize import bn_grad_finalize
from .bn_relu_conv1x1 import bn_relu_conv1x1
from .bn_relu_conv1x1_backward import bn_relu_conv1x1_backward
from .bn_relu_conv3x3 import bn_relu_conv3x3
from .bn_relu_conv3x3_backward import bn_relu_conv3x3_backward
from .bn_relu_pool_conv1x1 import bn_relu_pool_conv1x1
from .bn_relu_pool_conv1x1_backward import bn_relu_pool_conv1x1_backward
from .channel_stats import channel_stats
from .common import SUPPORTED_DTYPES, interpreting

__all__ = [
    "bn_coefficients", "bn_grad_finalize", "bn_relu_conv1x1", "bn_relu_conv1x1_backward", "bn_relu_conv3x3",
    "bn_relu_conv3x3_backward", "bn_relu_pool_conv1x1", "bn_relu_pool_conv1x1_backward", "channel_stats",
    "SUPPORTED_DTYPES", "interpreting",
]
