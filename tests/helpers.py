"""What the test files share as plain functions and data (their fixtures are in conftest.py): the
tolerances, BN randomization, backend parameters, running a fast model and the naive reference
side by side to compare everything, and the op suite's cases and check (``op_cases``, ``check_op``)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import pytest
import torch
from torch import nn

import densenet_fast
from densenet_fast import reference
from densenet_fast.ops import reference as op_reference

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


# ---- the op suite (tests/test_<op>.py): every backend's ops against densenet_fast.ops.reference ----

OP_BACKENDS = ("torch", "cpp", "composite", "triton")
# Where the Triton kernels run in the tests that call them directly: CUDA, else Triton's interpreter on CPU.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)
# Where each backend computes, by device (what its supports() accepts): only these cases are generated,
# so no case is skipped everywhere; one is skipped where its device is missing, or where the backend's
# supports() says it can't run here (test_op_suite_cases.py checks this table against supports()).
RUNS_ON = {
    "torch": {"cpu": ALL_DTYPES, "cuda": ALL_DTYPES},
    "cpp": {"cpu": (torch.float64, torch.float32)},
    "composite": {"cpu": (torch.float64, torch.float32), "cuda": ALL_DTYPES},
    # On CPU under Triton's interpreter (TRITON_INTERPRET=1, which conftest.py sets without a GPU);
    # there tl.dot on bfloat16 returns garbage (Triton 3.8), so bfloat16 runs on CUDA only.
    "triton": {"cpu": (torch.float32, torch.float16), "cuda": (torch.float32, torch.float16, torch.bfloat16)},
}
# float16 and bfloat16 (flash-attention's rule): the error of a backend's result against the float64
# reference is at most HALF_ERROR_FACTOR times PyTorch's own error, the same reference function run in
# the half dtype (densenet_fast.ops.reference: the BN-ReLU rounded to half, half convolutions,
# statistics in float32), plus a floor of float32's "stats" tolerance (where the exact result is
# representable PyTorch's error is 0). The Triton kernels, held to the TOLERANCES rows in half
# precision before this rule, are held to those as well, so no bound is looser than before; the
# backends that compute through ATen's half kernels (torch, composite) to the rule alone: PyTorch's
# own half results miss those rows (a half conv's weight gradient, 0.02 off at a value of 0.3).
# 3, not flash-attention's 2: a backend may round where the reference does not (ATen's half conv
# backward rounds dy to half before the reductions; the torch backend sums chunks' weight gradients;
# measured: up to 1.7x), one more rounding of the same size, and 3 still fails an error that grows
# with the problem (a half accumulator, a missed term).
HALF_ERROR_FACTOR = 3
HALF_RULE_ALONE = ("torch", "composite")


class OpCase(NamedTuple):
    """One backend on one device in one dtype, with the TOLERANCES row its results are held to."""

    backend: str
    device: str
    dtype: torch.dtype
    atol: Optional[float]  # None (half precision, HALF_RULE_ALONE): PyTorch's own error alone
    rtol: Optional[float]

    def open(self):
        """The backend; skips the test where this machine can't run the case (no CUDA, or the
        backend's supports() refuses tensors of this device and dtype here)."""
        if self.device == "cuda" and not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        backend = densenet_fast.ops.backend_named(self.backend)
        reason = backend.supports(torch.empty(0, device=self.device, dtype=self.dtype))
        if reason is not None:
            pytest.skip(f"backend {self.backend!r} on {self.device} {_param_id(self.dtype)}: {reason}")
        return backend

    @property
    def stats_dtype(self) -> torch.dtype:
        return torch.float32 if self.dtype in HALF_DTYPES else self.dtype


def op_cases(kind, shapes=(None,), *, dtypes=ALL_DTYPES, backends=OP_BACKENDS, slow=None):
    """``(case, shape)`` parameters: an OpCase for every backend x device x dtype that some machine
    runs (RUNS_ON), with TOLERANCES[kind][dtype] (``kind`` a name, or a dict of one per dtype), times
    ``shapes``; ``slow(case, shape)`` marks cases slow. A backend not built here is skipped (as
    backend_params), CUDA cases without CUDA."""
    available = densenet_fast.available_backends()
    params = []
    for name in backends:
        for device, runs in RUNS_ON[name].items():
            for dtype in (d for d in dtypes if d in runs):
                tolerance = TOLERANCES[kind if isinstance(kind, str) else kind[dtype]][dtype]
                if dtype in HALF_DTYPES and name in HALF_RULE_ALONE:
                    tolerance = (None, None)
                case = OpCase(name, device, dtype, *tolerance)
                for shape in shapes:
                    marks = []
                    if name not in available:
                        marks.append(pytest.mark.skip(reason=f"backend {name!r} is not built in this installation"))
                    if device == "cuda":
                        marks.append(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))
                    if slow is not None and slow(case, shape):
                        marks.append(pytest.mark.slow)
                    ids = [name, device, _param_id(dtype)] + ([] if shape is None else [_shape_id(shape)])
                    params.append(pytest.param(case, shape, marks=marks, id="-".join(ids)))
    return params


def _shape_id(shape) -> str:
    return "x".join(str(v) for v in shape) if isinstance(shape, tuple) else str(shape)


# How an op's tensors are laid out: whole NCHW or channels_last tensors, or ("_view") channels
# [offset, offset + C) of a buffer two channels wider past them, as the stage passes its feature and
# gradient buffers (offset 0: a channel prefix).
LAYOUTS = ("nchw", "channels_last", "nchw_view", "channels_last_view")


def seeded(shape, seed: int, *, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """float64 normal values of ``shape`` from a generator of their own (the same on every device)."""
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * std + mean


def op_tensor(shape, case: OpCase, layout: str, seed: int, *, offset: int = 0, mean: float = 0.0,
              std: float = 1.0, fill: float | None = None) -> torch.Tensor:
    """An N x C x H x W tensor of the case's dtype on its device in ``layout`` (LAYOUTS): seeded
    normal values, or ``fill`` (NaN: a buffer an op must overwrite)."""
    n, c, h, w = shape
    view = layout.endswith("_view")
    channels = c + offset + 2 if view else c
    t = seeded((n, channels, h, w), seed, mean=mean, std=std)
    if fill is not None:
        t.fill_(fill)
    t = t.to(device=case.device, dtype=case.dtype)
    if layout.startswith("channels_last"):
        t = t.contiguous(memory_format=torch.channels_last)
    return t[:, offset:offset + c] if view else t


def bn_vectors(c: int, case: OpCase, seed: int):
    """A BN's ``scale`` (about a fifth negative, as a BN weight may be, the rest in [0.5, 1.5]),
    ``shift`` (which makes the ReLU cut some values) and ``center``, in the statistics dtype."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(c, generator=g, dtype=torch.float64) < 0.2, -1.0, 1.0)
    scale = sign * torch.empty(c, dtype=torch.float64).uniform_(0.5, 1.5, generator=g)
    shift = 0.5 * torch.randn(c, generator=g, dtype=torch.float64)
    center = 0.3 * torch.randn(c, generator=g, dtype=torch.float64)
    return [t.to(device=case.device, dtype=case.stats_dtype) for t in (scale, shift, center)]


def conv_weight(out_c: int, in_c: int, k: int, case: OpCase, seed: int) -> torch.Tensor:
    """A conv weight of unit-variance outputs, in the case's dtype."""
    return (seeded((out_c, in_c, k, k), seed) / (in_c * k * k) ** 0.5).to(device=case.device, dtype=case.dtype)


def _map_tensors(tree, fn):
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # StatsOut, CoefsFrom, CoefSums, ConvGrads
        return type(tree)(*(_map_tensors(t, fn) for t in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map_tensors(t, fn) for t in tree)
    return tree


def _flat(tree) -> list:
    """The tensors (and Nones) of a result, in order."""
    if tree is None or isinstance(tree, torch.Tensor):
        return [tree]
    return [t for item in tree for t in _flat(item)]


def _copy_args(args, bases: dict, index: int, to_float64: bool):
    """``args`` with every tensor copied, views staying views of one copy of their buffer (so an op
    that writes a slice can be seen not to write past it); ``bases[id]`` collects each buffer's copies."""
    def copy(t: torch.Tensor) -> torch.Tensor:
        base = t if t._base is None else t._base
        entry = bases.setdefault(id(base), [base])
        if len(entry) <= index:
            new = base.to(torch.float64 if to_float64 and base.is_floating_point() else base.dtype, copy=True)
            assert new.stride() == base.stride(), "a case's buffers must be dense"
            entry.append(new)
        return entry[index].as_strided(t.shape, t.stride(), t.storage_offset() - base.storage_offset())

    return _map_tensors(args, copy)


def _assert_result_close(got, want, own, case: OpCase, what: str) -> None:
    assert (got is None) == (want is None), f"{what}: {got!r} where the reference gives {want!r}"
    if got is None:
        return
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert got.dtype == own.dtype, f"{what}: dtype {got.dtype}, expected {own.dtype}"
    assert got.device == own.device, f"{what}: on {got.device}"
    if case.atol is not None:
        torch.testing.assert_close(got.double(), want, atol=case.atol, rtol=case.rtol, equal_nan=True,
                                   msg=lambda m: f"{what}: {m}")
    if case.dtype in HALF_DTYPES:
        floor_atol, floor_rtol = TOLERANCES["stats"][torch.float32]
        known = ~want.isnan()
        want, err = want[known], (got.double() - want).abs()[known]
        own_err = (own.double()[known] - want).abs().max() if want.numel() else 0.0
        bound = HALF_ERROR_FACTOR * own_err + floor_atol + floor_rtol * want.abs()
        worst = (err - bound).argmax() if err.numel() else None
        assert worst is None or err[worst] <= bound[worst], (
            f"{what}: error {err[worst].item():.3g} against float64 at a value of {want[worst].item():.3g}, more "
            f"than {HALF_ERROR_FACTOR} x PyTorch's own {_param_id(case.dtype)} error {float(own_err):.3g} + floor")


def check_op(case: OpCase, op: str, *args, **kwargs):
    """Runs ``op`` of the case's backend on copies of ``args`` and the reference on float64 copies
    (and, for the half-precision rule, on copies in the case's dtype); checks every result and
    every tensor argument afterwards (what the op wrote in place) against the reference's, and that
    every element the reference leaves as it was (past a slice, inputs) is bit for bit unchanged.
    Returns the backend's result and its copies of ``args`` for further checks."""
    backend = case.open()
    bases: dict = {}
    for index, to_float64 in ((1, False), (2, True), (3, False)):  # backend, truth, own
        copied = _copy_args((args, kwargs), bases, index, to_float64)
        if index == 1:
            got_args = copied
        elif index == 2:
            truth_args = copied
        else:
            own_args = copied
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # full float32 on a GPU
    try:
        got = getattr(backend, op)(*got_args[0], **got_args[1])
        want = getattr(op_reference, op)(*truth_args[0], **truth_args[1])
        own = getattr(op_reference, op)(*own_args[0], **own_args[1])
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    for i, (g, w, o) in enumerate(zip(_flat(got), _flat(want), _flat(own), strict=True)):
        _assert_result_close(g, w, o, case, f"{case.backend} {op} result {i}")
    for i, (before, g, w, o) in enumerate(bases.values()):
        if not before.is_floating_point():
            continue
        what = f"{case.backend} {op} tensor argument {i} of shape {tuple(before.shape)}"
        _assert_result_close(g, w, o, case, what)
        kept = ~(w != before.double())  # NaN != NaN: a NaN the reference wrote over counts as changed
        assert torch.equal(g[kept], before[kept]), f"{what}: elements the op must not write were written"
    return got, got_args[0]
