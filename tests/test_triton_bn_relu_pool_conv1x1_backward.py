"""bn_relu_pool_conv1x1_backward (Triton) against its reference: the input gradient (new, or added
into a gradient buffer), the weight gradient and the BN reductions; odd sizes leave the last
row/column without gradient."""
import pytest
import torch

from densenet_fast.ops.triton import bn_relu_pool_conv1x1_backward, bn_relu_pool_conv1x1_backward_ref
from triton_cases import DEVICE, DTYPES, bn_affine

# (N, buffer channels, input channels, output channels, H, W)
SHAPES = [(1, 13, 13, 6, 5, 7), (2, 29, 19, 9, 2, 3), (2, 70, 70, 35, 17, 18)]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("accumulate", [False, True], ids=["new", "accumulate"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_ref(shape, channels_last, accumulate, dtype, atol, rtol):
    torch.manual_seed(0)
    n, c_buf, c_in, c_out, h, w = shape
    buf = torch.randn(n, c_buf, h, w, device=DEVICE).to(dtype)
    grad_buf = torch.randn(n, c_buf, h, w, device=DEVICE).to(dtype)
    if channels_last:
        buf = buf.contiguous(memory_format=torch.channels_last)
        grad_buf = grad_buf.contiguous(memory_format=torch.channels_last)
    x = buf[:, :c_in]
    scale, shift = bn_affine(c_in)
    center = (0.1 * torch.randn(c_in)).to(DEVICE)
    weight = (torch.randn(c_out, c_in, 1, 1, device=DEVICE) / c_in ** 0.5).to(dtype)
    grad_out = (torch.randn(n, c_out, h // 2, w // 2, device=DEVICE) / (n * h * w) ** 0.5).to(dtype)
    # Without accumulation the caller hands zeros (odd sizes leave pixels unwritten).
    grad_x = grad_buf[:, :c_in] if accumulate else torch.zeros_like(x)
    gx_ref, gw_ref, s_ref, sxc_ref = bn_relu_pool_conv1x1_backward_ref(
        grad_out, x, scale, shift, weight, center, grad_x if accumulate else None, True)
    gw, s, sxc = bn_relu_pool_conv1x1_backward(grad_out, x, scale, shift, weight, center, grad_x, accumulate, True)
    torch.testing.assert_close(grad_x, gx_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(gw, gw_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(s, s_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(sxc, sxc_ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("need_weight_grad", [True, False], ids=["with_weight_grad", "no_weight_grad"])
def test_adds_batch_statistics_terms_into_accumulators(need_weight_grad):
    """The transition's terms: coef_x += fx * sum_dy_xc and coef_c += fc * sum_dy, into the rows of
    the block's (2, C) accumulator, in the launch that finishes the sums."""
    torch.manual_seed(3)
    n, c_in, c_out, h, w = 2, 19, 9, 6, 5
    x = torch.randn(n, c_in, h, w, device=DEVICE)
    scale, shift = bn_affine(c_in)
    center = (0.1 * torch.randn(c_in)).to(DEVICE)
    weight = torch.randn(c_out, c_in, 1, 1, device=DEVICE) / c_in ** 0.5
    grad_out = torch.randn(n, c_out, h // 2, w // 2, device=DEVICE) / (n * h * w) ** 0.5
    acc = torch.randn(2, c_in, device=DEVICE)
    fx, fc = torch.randn(c_in, device=DEVICE), torch.randn(c_in, device=DEVICE)
    before = acc.clone()
    _, _, s_ref, sxc_ref = bn_relu_pool_conv1x1_backward_ref(grad_out, x, scale, shift, weight, center, None,
                                                             need_weight_grad)
    _, s, sxc = bn_relu_pool_conv1x1_backward(grad_out, x, scale, shift, weight, center, torch.zeros_like(x), False,
                                              need_weight_grad, coef_sums=(acc[0], acc[1], fx, fc))
    torch.testing.assert_close(s, s_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(acc[0], before[0] + fx * sxc_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(acc[1], before[1] + fc * s_ref, atol=1e-4, rtol=1e-4)
