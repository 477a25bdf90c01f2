"""bn_relu_conv3x3_backward (Triton) against bn_relu_conv3x3_backward_ref: the bottleneck's
gradient (new or accumulated), the weight gradient and the two BN reductions; ``grad_out`` as a
strided slice of a gradient buffer, as the block passes it without dropout."""
import pytest
import torch

from densenet_fast.ops.triton import bn_relu_conv3x3_backward, bn_relu_conv3x3_backward_ref
from triton_cases import DEVICE, DTYPES, bn_affine, layout as _layout

# (N, bottleneck channels, k, H, W); the largest takes about 5 s a case in float32 (the interpreter).
SHAPES = [(1, 12, 5, 5, 7), (2, 19, 4, 1, 6), pytest.param((2, 70, 13, 9, 11), marks=pytest.mark.slow)]


def _inputs(shape, dtype, channels_last):
    n, c_in, k, h, w = shape
    z = _layout(torch.randn(n, c_in, h, w, device=DEVICE).to(dtype), channels_last)
    scale, shift = bn_affine(c_in)
    center = (0.1 * torch.randn(c_in)).to(DEVICE)
    weight = (torch.randn(k, c_in, 3, 3, device=DEVICE) / (9 * c_in) ** 0.5).to(dtype)
    grad_buf = _layout(torch.randn(n, k + 9, h, w, device=DEVICE).to(dtype) / (n * h * w) ** 0.5, channels_last)
    return grad_buf[:, 5:5 + k], z, scale, shift, weight, center


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("accumulate", [False, True], ids=["new", "accumulate"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_ref(shape, channels_last, accumulate, dtype, atol, rtol):
    torch.manual_seed(0)
    grad_out, z, scale, shift, weight, center = _inputs(shape, dtype, channels_last)
    grad_z = torch.randn_like(z) if accumulate else torch.empty_like(z)
    gx_ref, gw_ref, s_ref, sxc_ref = bn_relu_conv3x3_backward_ref(
        grad_out, z, scale, shift, weight, center, grad_z if accumulate else None, True)
    gw, s, sxc = bn_relu_conv3x3_backward(grad_out, z, scale, shift, weight, center, grad_z, accumulate, True)
    torch.testing.assert_close(grad_z, gx_ref, atol=atol, rtol=rtol)
    assert gw.shape == weight.shape and gw.dtype == dtype and s.dtype == sxc.dtype == torch.float32
    torch.testing.assert_close(gw, gw_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(s, s_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(sxc, sxc_ref, atol=atol, rtol=rtol)


def test_without_weight_grad():
    torch.manual_seed(1)
    grad_out, z, scale, shift, weight, center = _inputs((2, 10, 3, 4, 5), torch.float32, False)
    grad_z = torch.empty_like(z)
    gw, s, sxc = bn_relu_conv3x3_backward(grad_out, z, scale, shift, weight, center, grad_z, False, False)
    gx_ref, _, s_ref, sxc_ref = bn_relu_conv3x3_backward_ref(grad_out, z, scale, shift, weight, center, None, False)
    assert gw.numel() == 0
    torch.testing.assert_close(grad_z, gx_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sxc, sxc_ref, atol=1e-4, rtol=1e-4)
