"""bn_relu_conv1x1 (Triton) against bn_relu_conv1x1_ref, on prefix views of NCHW and channels_last buffers."""
import pytest
import torch

from densenet_fast.ops.triton import bn_relu_conv1x1, bn_relu_conv1x1_ref
from triton_cases import DEVICE, DTYPES, bn_affine

# (N, buffer channels, input channels, output channels, H, W): batch 1, odd sizes, several tiles of
# pixels (9 x 11 > 64), of input channels (70 > 32) and of output channels (150 > 128).
SHAPES = [(1, 13, 13, 11, 5, 7), (2, 29, 19, 20, 3, 3), (2, 80, 70, 150, 9, 11)]


def _buffer(n, c, h, w, dtype, channels_last):
    buf = torch.randn(n, c, h, w, device=DEVICE).to(dtype)
    return buf.contiguous(memory_format=torch.channels_last) if channels_last else buf


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_ref(shape, channels_last, dtype, atol, rtol):
    torch.manual_seed(0)
    n, c_buf, c_in, c_out, h, w = shape
    x = _buffer(n, c_buf, h, w, dtype, channels_last)[:, :c_in]
    scale, shift = bn_affine(c_in)
    weight = (torch.randn(c_out, c_in, 1, 1, device=DEVICE) / c_in ** 0.5).to(dtype)
    z, mean, var = bn_relu_conv1x1(x, scale, shift, weight, True)
    z_ref, mean_ref, var_ref = bn_relu_conv1x1_ref(x, scale, shift, weight, True)
    assert z.is_contiguous() and z.dtype == dtype and mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(z, z_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(mean, mean_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(var, var_ref, atol=atol, rtol=rtol)


def test_without_stats_and_offset_slice():
    torch.manual_seed(1)
    buf = _buffer(2, 24, 5, 5, torch.float32, False)
    x = buf[:, 3:20]  # a slice starting at an odd channel, not just a prefix
    scale, shift = bn_affine(17)
    weight = torch.randn(9, 17, 1, 1, device=DEVICE) / 17 ** 0.5
    z, mean, var = bn_relu_conv1x1(x, scale, shift, weight, False)
    assert mean.numel() == 0 and var.numel() == 0
    torch.testing.assert_close(z, bn_relu_conv1x1_ref(x, scale, shift, weight, False)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("affine", ["weight_and_bias", "weight_only", "none"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]], ids=str)
def test_computes_its_coefficients_from_statistics(shape, affine):
    """With coefs_from the kernel computes scale and shift from the BN's mean, invstd, weight and
    bias as it loads each input tile, and writes them (every input channel, over several K tiles
    and programs) into the (2, C_in) block the backward reads."""
    from densenet_fast.ops.triton import bn_coefficients_ref

    torch.manual_seed(3)
    n, c_buf, c_in, c_out, h, w = shape
    x = _buffer(n, c_buf, h, w, torch.float32, False)[:, :c_in]
    mean, invstd = 0.3 * torch.randn(c_in, device=DEVICE), torch.rand(c_in, device=DEVICE) + 0.5
    bn_w = torch.randn(c_in, device=DEVICE) if affine != "none" else None
    bn_b = torch.randn(c_in, device=DEVICE) if affine == "weight_and_bias" else None
    weight = torch.randn(c_out, c_in, 1, 1, device=DEVICE) / c_in ** 0.5
    coefs = torch.full((2, c_in), float("nan"), device=DEVICE)
    z, z_mean, z_var = bn_relu_conv1x1(x, None, None, weight, True, coefs_from=(mean, invstd, bn_w, bn_b, coefs))
    coefs_ref = bn_coefficients_ref(mean, invstd, bn_w, bn_b).float()
    torch.testing.assert_close(coefs, coefs_ref, atol=1e-6, rtol=1e-6)
    z_ref, mean_ref, var_ref = bn_relu_conv1x1_ref(x, coefs_ref[0], coefs_ref[1], weight, True)
    torch.testing.assert_close(z, z_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z_mean, mean_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z_var, var_ref, atol=1e-4, rtol=1e-4)
