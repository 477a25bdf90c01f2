"""bn_relu_conv1x1_backward (Triton) against bn_relu_conv1x1_backward_ref: the accumulated input
gradient of a prefix view, the weight gradient and the two BN reductions."""
import pytest
import torch

from densenet_fast.ops.triton import bn_relu_conv1x1_backward, bn_relu_conv1x1_backward_ref
from triton_cases import DEVICE, DTYPES, bn_affine, layout as _layout

# (N, buffer channels, input channels, output channels, H, W)
SHAPES = [(1, 13, 13, 11, 5, 7), (2, 29, 19, 20, 3, 3), (2, 80, 70, 90, 9, 11)]


def _inputs(shape, dtype, channels_last):
    n, c_buf, c_in, c_out, h, w = shape
    x = _layout(torch.randn(n, c_buf, h, w, device=DEVICE).to(dtype), channels_last)[:, :c_in]
    scale, shift = bn_affine(c_in)
    center = (0.1 * torch.randn(c_in)).to(DEVICE)
    weight = (torch.randn(c_out, c_in, 1, 1, device=DEVICE) / c_in ** 0.5).to(dtype)
    grad_out = (torch.randn(n, c_out, h, w, device=DEVICE) / (n * h * w) ** 0.5).to(dtype)
    grad_buf = _layout(torch.randn(n, c_buf, h, w, device=DEVICE).to(dtype), channels_last)
    return grad_out, x, scale, shift, weight, center, grad_buf


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_accumulates_into_prefix(shape, channels_last, dtype, atol, rtol):
    torch.manual_seed(0)
    grad_out, x, scale, shift, weight, center, grad_buf = _inputs(shape, dtype, channels_last)
    c_in = x.shape[1]
    before = grad_buf.clone()
    gx_ref, gw_ref, s_ref, sxc_ref = bn_relu_conv1x1_backward_ref(grad_out, x, scale, shift, weight, center,
                                                                   grad_buf[:, :c_in], True)
    gw, s, sxc = bn_relu_conv1x1_backward(grad_out, x, scale, shift, weight, center, grad_buf[:, :c_in], True, True)
    torch.testing.assert_close(grad_buf[:, :c_in], gx_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad_buf[:, c_in:], before[:, c_in:], atol=0, rtol=0)  # beyond the prefix: untouched
    assert gw.dtype == dtype and s.dtype == sxc.dtype == torch.float32
    torch.testing.assert_close(gw, gw_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(s, s_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(sxc, sxc_ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_new_gradient_without_weight_grad(channels_last):
    torch.manual_seed(1)
    grad_out, x, scale, shift, weight, center, _ = _inputs((2, 21, 15, 6, 7, 5), torch.float32, channels_last)
    grad_x = torch.empty_like(x)
    gw, s, sxc = bn_relu_conv1x1_backward(grad_out, x, scale, shift, weight, center, grad_x, False, False)
    gx_ref, _, s_ref, sxc_ref = bn_relu_conv1x1_backward_ref(grad_out, x, scale, shift, weight, center, None, False)
    assert gw.numel() == 0
    torch.testing.assert_close(grad_x, gx_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sxc, sxc_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("need_weight_grad", [True, False], ids=["weight_grad", "no_weight_grad"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]], ids=str)
def test_adds_batch_statistics_terms_into_accumulators(shape, need_weight_grad):
    """coef_x += fx * sum_dy_xc and coef_c += fc * sum_dy in the launch that finishes the sums,
    on channel-prefix views of a (2, C) accumulator (the block's), the channels past it untouched."""
    torch.manual_seed(2)
    grad_out, x, scale, shift, weight, center, grad_buf = _inputs(shape, torch.float32, False)
    c_in, c_buf = x.shape[1], grad_buf.shape[1]
    acc = torch.randn(2, c_buf, device=DEVICE)
    fx, fc = torch.randn(c_in, device=DEVICE), torch.randn(c_in, device=DEVICE)
    before = acc.clone()
    _, _, s_ref, sxc_ref = bn_relu_conv1x1_backward_ref(grad_out, x, scale, shift, weight, center,
                                                        grad_buf[:, :c_in], need_weight_grad)
    _, s, sxc = bn_relu_conv1x1_backward(grad_out, x, scale, shift, weight, center, grad_buf[:, :c_in], True,
                                         need_weight_grad, coef_sums=(acc[0, :c_in], acc[1, :c_in], fx, fc))
    torch.testing.assert_close(s, s_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(acc[0, :c_in], before[0, :c_in] + fx * sxc_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(acc[1, :c_in], before[1, :c_in] + fc * s_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(acc[:, c_in:], before[:, c_in:], atol=0, rtol=0)

