"""bn_grad_finalize (Triton) against bn_grad_finalize_ref, in place on odd-offset channel slices of
NCHW and channels_last gradient buffers; the channels around the slice stay untouched."""
import pytest
import torch

from densenet_fast.ops.triton import bn_grad_finalize, bn_grad_finalize_ref
from helpers import dtype_params
from triton_cases import DEVICE

DTYPES = (dtype_params("stats", torch.float32, torch.float16)
          + dtype_params("finalize", torch.bfloat16, cuda_only=(torch.bfloat16,)))
# (N, buffer channels, channel offset, channels, H, W)
SHAPES = [(1, 9, 3, 5, 3, 5), (2, 50, 7, 37, 13, 11)]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_ref(shape, channels_last, dtype, atol, rtol):
    torch.manual_seed(0)
    n, c_buf, offset, c, h, w = shape
    buf = torch.randn(n, c_buf, h, w, device=DEVICE).to(dtype)
    grad_buf = torch.randn(n, c_buf, h, w, device=DEVICE).to(dtype)
    if channels_last:
        buf = buf.contiguous(memory_format=torch.channels_last)
        grad_buf = grad_buf.contiguous(memory_format=torch.channels_last)
    new = slice(offset, offset + c)
    center, coef_x, coef_c = (torch.randn(c, device=DEVICE) for _ in range(3))
    before = grad_buf.clone()
    expected = bn_grad_finalize_ref(grad_buf[:, new], buf[:, new], center, coef_x, coef_c)
    bn_grad_finalize(grad_buf[:, new], buf[:, new], center, coef_x, coef_c)
    torch.testing.assert_close(grad_buf[:, new], expected, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad_buf[:, :offset], before[:, :offset], atol=0, rtol=0)
    torch.testing.assert_close(grad_buf[:, offset + c:], before[:, offset + c:], atol=0, rtol=0)
