"""Shared checks: run a fast model and the naive reference side by side and compare everything."""
from __future__ import annotations

import torch
from torch import nn

from densenet_fast import reference

# (atol, rtol) per dtype: float64 agrees to rounding; float32 accumulates in a different order.
TOLERANCES = {torch.float64: (1e-9, 1e-7), torch.float32: (2e-4, 2e-3)}


def reference_twin(model: nn.Module, **config) -> nn.Module:
    """The naive reference with ``model``'s weights, buffers, BN settings and train/eval modes."""
    ref = reference.DenseNet(**config).to(dtype=next(model.parameters()).dtype)
    ours = dict(model.named_modules())
    for name, module in ref.named_modules():
        src = ours[name]
        module.training = src.training
        if isinstance(module, nn.BatchNorm2d):
            module.momentum, module.eps = src.momentum, src.eps
            module.track_running_stats = src.track_running_stats
            if src.running_mean is None:
                module.running_mean = module.running_var = module.num_batches_tracked = None
    ref.load_state_dict(model.state_dict())
    for p_ref, p in zip(ref.parameters(), model.parameters()):
        p_ref.requires_grad_(p.requires_grad)
    return ref


def assert_close(actual, expected, dtype, what):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def step(model: nn.Module, x: torch.Tensor, grad_seed: int, seed: int = 0):
    """One forward and backward with a seeded output gradient; returns (out, input grad, param grads)."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # dropout masks
    out = model(x)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(grad_seed)).to(out.device)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [x] + params, g, allow_unused=True)
    return out.detach(), grads[0], dict(zip([n for n, p in model.named_parameters() if p.requires_grad], grads[1:]))


def compare_with_reference(model: nn.Module, ref: nn.Module, x: torch.Tensor, steps: int = 2):
    """Train-mode outputs, input grads and every parameter grad over ``steps`` steps, then the
    running stats, then eval-mode outputs."""
    dtype = x.dtype
    for i in range(steps):
        out, gx, grads = step(model, x, grad_seed=100 + i, seed=i)
        out_r, gx_r, grads_r = step(ref, x, grad_seed=100 + i, seed=i)
        assert_close(out, out_r, dtype, f"step {i} output")
        assert_close(gx, gx_r, dtype, f"step {i} input grad")
        assert grads.keys() == grads_r.keys()
        for name in grads:
            if grads_r[name] is None:
                assert grads[name] is None or torch.count_nonzero(grads[name]) == 0, name
            else:
                assert_close(grads[name], grads_r[name], dtype, f"step {i} grad of {name}")
    ref_buffers = dict(ref.named_buffers())
    for name, buf in model.named_buffers():
        if buf.is_floating_point():
            assert_close(buf, ref_buffers[name], dtype, f"buffer {name}")
        else:
            torch.testing.assert_close(buf, ref_buffers[name], msg=name)
    model.eval()
    ref.eval()
    with torch.no_grad():
        assert_close(model(x), ref(x), dtype, "eval output")


def randomize_bn(model: nn.Module) -> nn.Module:
    """Random BN affine parameters and running stats (seeded by the caller), so no BN is the identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


def autocast_errors(model: nn.Module, ref: nn.Module, x: torch.Tensor, autocast_dtype=None):
    """(output, max abs error of the output, max abs error of the parameter grads) of ``model`` under
    autocast on ``x``'s device against ``ref``, a float64 twin run on ``x`` in float64."""
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(x)
    out.float().sum().backward()
    out_ref = ref(x.double())
    out_ref.sum().backward()
    out_err = (out.double() - out_ref).abs().max().item()
    grad_err = max((p.grad.double() - q.grad).abs().max().item() for p, q in zip(model.parameters(), ref.parameters()))
    return out, out_err, grad_err
