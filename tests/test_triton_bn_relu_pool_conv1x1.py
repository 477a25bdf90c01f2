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


def test_computes_its_coefficients_from_statistics():
    """coefs_from as in bn_relu_conv1x1: the transition's scale and shift computed in the kernel
    (over several K tiles and programs) and written into the block the backward reads."""
    from densenet_fast.ops.triton import bn_coefficients_ref

    torch.manual_seed(4)
    n, c_in, c_out, h, w = 2, 70, 20, 9, 11
    x = torch.randn(n, c_in + 5, h, w, device=DEVICE)[:, :c_in]
    mean, invstd = 0.3 * torch.randn(c_in, device=DEVICE), torch.rand(c_in, device=DEVICE) + 0.5
    bn_w, bn_b = torch.randn(c_in, device=DEVICE), torch.randn(c_in, device=DEVICE)
    weight = torch.randn(c_out, c_in, 1, 1, device=DEVICE) / c_in ** 0.5
    coefs = torch.full((2, c_in), float("nan"), device=DEVICE)
    out = bn_relu_pool_conv1x1(x, None, None, weight, (mean, invstd, bn_w, bn_b, coefs))
    coefs_ref = bn_coefficients_ref(mean, invstd, bn_w, bn_b).float()
    torch.testing.assert_close(coefs, coefs_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, bn_relu_pool_conv1x1_ref(x, coefs_ref[0], coefs_ref[1], weight), atol=1e-4,
                               rtol=1e-4)
