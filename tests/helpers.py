"""What the test files share as plain functions and data (their fixtures are in conftest.py): the
tolerances, BN randomization, backend parameters, and running a fast model and the naive reference
side by side to compare everything."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import densenet_fast
from densenet_fast import reference

# (atol, rtol) per dtype, by what a test compares: the one table of tolerances. A dtype's numbers
# differ between two kinds only where the stricter could not be used for both: it failed the other
# kind's tests, or those tests also run on a GPU, where it was not tried (the "op" rows, which the
# Triton op tests and the cpp CUDA tests share, and every half-precision row).
TOLERANCES = {
    # One op (a fused BN-ReLU-conv or pooling, forward or backward; the cpp ops' statistics and
    # per-channel primitives) against a reference computed in float64 or in the op's dtype.
    "op": {torch.float64: (1e-10, 1e-9), torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2),
           torch.bfloat16: (5e-2, 2e-2)},
    # Per-channel statistics and coefficients (Triton's channel_stats and bn_grad_finalize, every
    # backend's bn_coefficients, densenet_fast.bn_math), accumulated in float32 (float64 for float64
    # inputs), against float64.
    "stats": {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3),
              torch.bfloat16: (1e-3, 1e-3)},
    # Triton's bn_grad_finalize in bfloat16 (float32 and float16: "stats"): its output is rounded to
    # bfloat16 (2**-8 relative).
    "finalize": {torch.bfloat16: (1e-2, 1e-2)},
    # The cpp extension's CUDA kernels in half precision (statistics, BN-ReLU backward) against its
    # CPU kernels in float64 (float64 and float32: "op").
    "cpp_cuda": {torch.float16: (2e-2, 1e-2), torch.bfloat16: (1e-1, 2e-2)},
    # A whole model (outputs, every gradient, running statistics over steps) against the naive
    # reference or torchvision. float64 agrees to rounding (the worst case, in test_properties, passes
    # at 2e-13 and fails at 1e-13); float32 (run on a GPU) accumulates in another order.
    "model": {torch.float64: (1e-12, 1e-12), torch.float32: (2e-4, 2e-3)},
}


def dtype_params(kind: str, *dtypes: torch.dtype, cuda_only: tuple[torch.dtype, ...] = ()):
    """``(dtype, atol, rtol)`` parameters from TOLERANCES[kind], with ids such as ``float32``; the
    dtypes in ``cuda_only`` are skipped on a machine without CUDA."""
    params = []
    for dtype in dtypes:
        name = _param_id(dtype)
        marks = () if dtype not in cuda_only else pytest.mark.skipif(not torch.cuda.is_available(),
                                                                     reason=f"{name} needs CUDA")
        params.append(pytest.param(dtype, *TOLERANCES[kind][dtype], id=name, marks=marks))
    return params


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
    atol, rtol = TOLERANCES["model"][dtype]
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


# The ranges randomize_bn draws from (uniformly): scales around 1, shifts of both signs, running
# statistics off their 0 / 1 defaults, so no BN is the identity and every term counts.
BN_RANGES = {"weight": (0.5, 1.5), "bias": (-0.5, 0.5), "running_mean": (-0.2, 0.2), "running_var": (0.5, 2.0)}


def randomize_bn(model: nn.Module, seed: int | None = None, *, running_stats: bool = True,
                 types: tuple[type, ...] = (nn.BatchNorm2d,)) -> nn.Module:
    """Random BN affine parameters and (with ``running_stats``) running statistics, in BN_RANGES, for
    every module of ``types`` in ``model`` (``model`` itself included; FrozenBatchNorm2d keeps them as
    buffers): from the global RNG (seeded by the caller) or, with ``seed``, from a generator of their
    own. Returns ``model``."""
    g = None if seed is None else torch.Generator().manual_seed(seed)
    names = list(BN_RANGES) if running_stats else ["weight", "bias"]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, types):
                for name in names:
                    t = getattr(m, name)
                    if t is not None:
                        t.uniform_(*BN_RANGES[name], generator=g)
    return model


def backend_params(*cases, slow: tuple[str, ...] = ()):
    """Parameters for the ``backend`` fixture (conftest.py; ``indirect=["backend"]``): backend names,
    or tuples starting with one (``("triton", torch.float32)``), with readable ids. A backend not
    built in this installation is skipped (pass plain names to require it instead: the fixture then
    fails where it is missing); the cases of the backends in ``slow`` are marked slow."""
    available = densenet_fast.available_backends()
    params = []
    for case in cases:
        values = case if isinstance(case, tuple) else (case,)
        marks = [pytest.mark.slow] if values[0] in slow else []
        if values[0] not in available:
            marks.append(pytest.mark.skip(reason=f"backend {values[0]!r} is not built in this installation"))
        params.append(pytest.param(*values, marks=marks, id="-".join(_param_id(v) for v in values)))
    return params


def _param_id(value) -> str:
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else str(value)


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
