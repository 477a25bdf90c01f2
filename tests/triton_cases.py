"""What the Triton op tests share. ``TRITON_INTERPRET`` is set in conftest.py, before triton loads."""
import torch

from helpers import dtype_params

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (dtype, atol, rtol) of the fused ops; bf16 tl.dot is wrong in Triton 3.8's CPU interpreter, so bf16 runs on CUDA only.
DTYPES = dtype_params("op", torch.float32, torch.float16, torch.bfloat16, cuda_only=(torch.bfloat16,))


def layout(t, channels_last):
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def bn_affine(c):
    """A layer's BN-ReLU as (scale, shift) on DEVICE: about a fifth of the scales negative (as a
    BN weight can be), the rest in [0.5, 1.5], and shifts that make the ReLU cut some values."""
    sign = torch.where(torch.rand(c) < 0.2, -1.0, 1.0)
    return (sign * torch.empty(c).uniform_(0.5, 1.5)).to(DEVICE), (0.5 * torch.randn(c)).to(DEVICE)
