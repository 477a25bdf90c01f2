"""bn_relu_pool_conv1x1 (the transition, Triton) against bn_relu_pool_conv1x1_ref: whole NCHW and
channels_last buffers, a channel slice, odd heights and widths (the last row/column is dropped)."""
import pytest
import torch

from densenet_fast.ops.triton import bn_relu_pool_conv1x1, bn_relu_pool_conv1x1_ref
from triton_cases import DEVICE, DTYPES, bn_affine

# (N, buffer channels, input channels, output channels, H, W)
SHAPES = [(1, 13, 13, 6, 5, 7), (2, 29, 19, 9, 2, 3), (2, 70, 70, 35, 17, 18)]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_ref(shape, channels_last, dtype, atol, rtol):
    torch.manual_seed(0)
    n, c_buf, c_in, c_out, h, w = shape
    buf = torch.randn(n, c_buf, h, w, device=DEVICE).to(dtype)
    if channels_last:
        buf = buf.contiguous(memory_format=torch.channels_last)
    x = buf[:, :c_in]
    scale, shift = bn_affine(c_in)
    weight = (torch.randn(c_out, c_in, 1, 1, device=DEVICE) / c_in ** 0.5).to(dtype)
    out = bn_relu_pool_conv1x1(x, scale, shift, weight)
    out_ref = bn_relu_pool_conv1x1_ref(x, scale, shift, weight)
    assert out.shape == (n, c_out, h // 2, w // 2) and out.dtype == dtype
    torch.testing.assert_close(out, out_ref, atol=atol, rtol=rtol)
