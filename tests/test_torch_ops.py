"""The torch backend's ops against plain PyTorch references (the model tests cover the rest)."""
import torch
import torch.nn.functional as F

from densenet_fast.ops.torch_backend import TorchBackend


def _reference_conv1x1_weight_grad(x, scale, shift, weight, grad_out):
    y = F.relu(x * scale[:, None, None] + shift[:, None, None])
    w = weight.detach().requires_grad_(True)
    F.conv2d(y, w).backward(grad_out)
    return w.grad


def test_half_precision_weight_grads_are_summed_in_float32():
    # 256 images, each rounded to bf16 before the sum, would drift like sqrt(256) times one rounding.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 24, 4, 4, generator=g)
    scale, shift = torch.rand(24, generator=g) + 0.5, torch.randn(24, generator=g) * 0.1
    weight = torch.randn(16, 24, 1, 1, generator=g) * 0.2
    grad_out = torch.randn(256, 16, 4, 4, generator=g)
    exact = _reference_conv1x1_weight_grad(x.double(), scale.double(), shift.double(), weight.double(),
                                           grad_out.double())
    aten = _reference_conv1x1_weight_grad(x.bfloat16(), scale.bfloat16(), shift.bfloat16(), weight.bfloat16(),
                                          grad_out.bfloat16())
    ours = TorchBackend().bn_relu_conv1x1_backward(grad_out.bfloat16(), x.bfloat16(), scale, shift, weight.bfloat16(),
                                                   torch.zeros(24), None, True).grad_weight
    err = (ours.double() - exact).norm() / exact.norm()
    err_aten = (aten.double() - exact).norm() / exact.norm()
    assert err <= 1.5 * err_aten, (err.item(), err_aten.item())
