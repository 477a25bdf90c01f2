"""bn_relu_conv3x3 (Triton) against bn_relu_conv3x3_ref: new channels written into an odd-offset
slice of an NCHW or channels_last buffer, with and without dropout's noise, and their statistics."""
import pytest
import torch

from densenet_fast.ops.triton import bn_relu_conv3x3, bn_relu_conv3x3_ref
from triton_cases import DEVICE, DTYPES, bn_affine, layout as _layout

# (N, bottleneck channels, new channels k, H, W): batch 1, 1-pixel-wide maps, odd sizes, two pixel
# tiles (9 x 11 > 64), two input-channel blocks (40 > 32), k not a multiple of 8.
SHAPES = [(1, 12, 5, 5, 7), (2, 19, 4, 1, 6), (2, 40, 13, 9, 11)]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("with_noise", [False, True], ids=["plain", "noise"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_writes_slice_and_stats(shape, channels_last, with_noise, dtype, atol, rtol):
    torch.manual_seed(0)
    n, c_in, k, h, w = shape
    z = _layout(torch.randn(n, c_in, h, w, device=DEVICE).to(dtype), channels_last)
    scale, shift = bn_affine(c_in)
    weight = (torch.randn(k, c_in, 3, 3, device=DEVICE) / (9 * c_in) ** 0.5).to(dtype)
    noise = None
    if with_noise:
        noise = (torch.rand(n, k, h, w, device=DEVICE) > 0.3).to(dtype) / 0.7
    offset = 7  # an odd channel offset in the buffer
    buf = _layout(torch.randn(n, offset + k + 3, h, w, device=DEVICE).to(dtype), channels_last)
    before = buf.clone()
    mean, var = bn_relu_conv3x3(z, scale, shift, weight, buf[:, offset:offset + k], noise, True)
    f_ref, mean_ref, var_ref = bn_relu_conv3x3_ref(z, scale, shift, weight, noise, True)
    torch.testing.assert_close(buf[:, offset:offset + k], f_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(buf[:, :offset], before[:, :offset], atol=0, rtol=0)
    torch.testing.assert_close(buf[:, offset + k:], before[:, offset + k:], atol=0, rtol=0)
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean, mean_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(var, var_ref, atol=atol, rtol=rtol)


def test_without_stats():
    torch.manual_seed(1)
    z = torch.randn(2, 10, 4, 5, device=DEVICE)
    scale, shift = torch.rand(10, device=DEVICE) + 0.5, torch.randn(10, device=DEVICE)
    weight = torch.randn(6, 10, 3, 3, device=DEVICE) / 10
    out = torch.empty(2, 6, 4, 5, device=DEVICE)
    mean, var = bn_relu_conv3x3(z, scale, shift, weight, out, None, False)
    assert mean.numel() == 0 and var.numel() == 0
    torch.testing.assert_close(out, bn_relu_conv3x3_ref(z, scale, shift, weight, None, False)[0], atol=1e-4, rtol=1e-4)
