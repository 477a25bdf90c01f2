"""Measuring training steps: peak memory and step time of ours against torchvision, in one run.

A step is forward, ``.sum().backward()``. Each model gets a warm-up step first, so parameter
gradients already exist and the peak counts activations and transients, as in a training loop
that zeroes gradients in place. Step times are interleaved across models round by round and the
median is reported, so a noisy neighbour on a shared machine hits every model alike.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .memory import peak_memory

MiB = 1 << 20


@dataclass
class StepResult:
    name: str
    peak_bytes: int
    step_times: list[float] = field(default_factory=list)

    @property
    def step_time(self) -> float:
        return statistics.median(self.step_times) if self.step_times else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model: nn.Module, x: torch.Tensor, autocast_dtype: Optional[torch.dtype] = None) -> Callable[[], None]:
    """A closure running one training step of ``model`` on ``x``."""

    def step() -> None:
        if autocast_dtype is None:
            out = model(x)
        else:
            with torch.autocast(x.device.type, dtype=autocast_dtype):
                out = model(x)
        out.float().sum().backward()

    return step


def compare_steps(models: dict[str, nn.Module], x: torch.Tensor, rounds: int = 3,
                  autocast_dtype: Optional[torch.dtype] = None,
                  progress: Optional[Callable[[str], None]] = None) -> list[StepResult]:
    """Peak memory and median step time of each model on the same input, measured in one run."""
    results = []
    steps = {}
    for name, model in models.items():
        if progress:
            progress(f"{name}: warm-up and peak memory")
        model.train()
        step = make_step(model, x, autocast_dtype)
        step()  # warm-up: allocator, kernels, parameter gradients
        _sync(x.device)
        results.append(StepResult(name, peak_memory(step, x.device)))
        steps[name] = step
    for r in range(rounds):
        if progress:
            progress(f"timing round {r + 1}/{rounds}")
        for result in results:
            _sync(x.device)
            start = time.perf_counter()
            steps[result.name]()
            _sync(x.device)
            result.step_times.append(time.perf_counter() - start)
    return results


def activation_peak(model: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes of one training step after a warm-up step (parameter gradients already exist)."""
    model.train()
    step = make_step(model, x)
    step()
    return peak_memory(step, x.device)


def format_table(results: list[StepResult], baseline: str) -> str:
    """A markdown table with ratios against the result named ``baseline``."""
    base = next(r for r in results if r.name == baseline)
    lines = ["| model | peak memory | vs " + baseline + " | step time | vs " + baseline + " |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.peak_bytes / MiB:.0f} MiB | {r.peak_bytes / base.peak_bytes:.3f}x "
                     f"| {r.step_time:.3f} s | {r.step_time / base.step_time:.3f}x |")
    return "\n".join(lines)


def torchvision_densenet_bc(depth: int, growth_rate: int = 12, num_classes: int = 10,
                            memory_efficient: bool = False) -> nn.Module:
    """torchvision's DenseNet in the DenseNet-BC CIFAR configuration (3x3 stem, no pooling stem)."""
    import torchvision

    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"DenseNet-BC depth must be 6n + 4 with n >= 1, got {depth}")
    n = (depth - 4) // 6
    model = torchvision.models.DenseNet(growth_rate, (n, n, n), 2 * growth_rate, num_classes=num_classes,
                                        memory_efficient=memory_efficient)
    model.features.conv0 = nn.Conv2d(3, 2 * growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
    for name in ("norm0", "relu0", "pool0"):
        delattr(model.features, name)
    return model


# --- What the CLI compares --------------------------------------------------------------------------

MODEL_NAMES = ("densenet121", "densenet161", "densenet169", "densenet201", "densenet264")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BASELINE = "torchvision"


class Pinned(nn.Module):
    """Runs ``model``'s forward with ``backend`` pinned; backward reuses the backend the forward chose."""

    def __init__(self, model: nn.Module, backend: str):
        super().__init__()
        self.model, self.backend = model, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .ops import get_backend_name, set_backend

        previous = get_backend_name()
        set_backend(self.backend)
        try:
            return self.model(x)
        finally:
            set_backend(previous)


def torchvision_model(model: Optional[str], depth: Optional[int], growth_rate: int = 12,
                      memory_efficient: bool = False) -> nn.Module:
    """torchvision's ``model`` (a name from MODEL_NAMES), or its DenseNet-BC of ``depth`` when no name is given."""
    import torchvision

    if model is None:
        return torchvision_densenet_bc(depth, growth_rate, memory_efficient=memory_efficient)
    if model == "densenet264":  # torchvision has no builder for it; the same config as densenet_fast's
        return torchvision.models.DenseNet(32, (6, 12, 64, 48), 64, memory_efficient=memory_efficient)
    if model not in MODEL_NAMES:
        raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODEL_NAMES)}")
    return getattr(torchvision.models, model)(memory_efficient=memory_efficient)


def comparison_models(model: Optional[str], depth: Optional[int], backends: list[str], growth_rate: int = 12,
                      compile: bool = False) -> dict[str, nn.Module]:
    """torchvision (the baseline, first), torchvision memory_efficient, optionally torch.compile'd torchvision,
    and densenet_fast pinned to each backend, all with the same weights."""
    from .convert import convert

    tv = torchvision_model(model, depth, growth_rate)
    models: dict[str, nn.Module] = {BASELINE: tv}
    tv_me = torchvision_model(model, depth, growth_rate, memory_efficient=True)
    tv_me.load_state_dict(tv.state_dict())
    models["torchvision memory_efficient"] = tv_me
    if compile:
        import copy

        models["torchvision compiled"] = torch.compile(copy.deepcopy(tv))
    for backend in backends:
        models[f"densenet_fast[{backend}]"] = Pinned(convert(tv), backend)
    return models


def results_rows(results: list[StepResult], baseline: str = BASELINE) -> list[dict]:
    """One dict per result with ratios against ``baseline`` (for JSON/CSV output)."""
    base = next(r for r in results if r.name == baseline)
    return [{"model": r.name, "peak_bytes": r.peak_bytes, "peak_mib": round(r.peak_bytes / MiB, 2),
             "memory_vs_baseline": round(r.peak_bytes / base.peak_bytes, 4),
             "step_time_s": round(r.step_time, 4), "time_vs_baseline": round(r.step_time / base.step_time, 4),
             "step_times_s": [round(t, 4) for t in r.step_times]} for r in results]


# --- Memory of a whole training step --------------------------------------------------------------

def state_bytes(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """Bytes of what a training loop keeps between steps: parameters, buffers, gradients, optimizer state."""
    tensors = {t.data_ptr(): t for t in list(model.parameters()) + list(model.buffers())}
    tensors.update({p.grad.data_ptr(): p.grad for p in model.parameters() if p.grad is not None})
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors.update({t.data_ptr(): t for t in state.values() if isinstance(t, torch.Tensor)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def training_memory(fn: Callable[[], object], model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    device: torch.device) -> tuple[object, int]:
    """Run one training step ``fn`` and return (its result, the step's peak bytes).

    The peak counts what existed before the step (parameters, buffers, gradients, optimizer state:
    ``state_bytes``) plus the peak of what the step allocated (activations, saved tensors,
    temporaries, gradients and optimizer state created by a first step).
    """
    device = torch.device(device)
    out: list[object] = []
    before = state_bytes(model, optimizer)
    peak = peak_memory(lambda: out.append(fn()), device)
    return out[0], before + peak


# --- Deepest DenseNet-BC within a memory budget ---------------------------------------------------
#
# total(depth) = state(depth) + input + transient(depth, batch), where
#   state      = parameters + buffers + gradients + SGD momentum buffers, counted exactly from the
#                architecture (no model is built for it);
#   transient  = the peak of what one training step (forward, cross-entropy, backward, SGD step)
#                allocates on top of that: activations, saved tensors, temporaries.
# The transient part is measured at a few small depths, fitted with a quadratic in depth, the budget
# equation is solved on the fit, and the answer is measured again ("verified") to correct the fit.
# On CUDA every measurement is at the requested batch (torch.cuda.max_memory_allocated). On CPU the
# profiler measures batches 1 and 2, transient = fixed + batch * per_image, so the answer is an
# estimate for the requested batch.

MAX_DEPTH_KINDS = ("torchvision", "torchvision memory_efficient")


def bc_counts(depth: int, growth_rate: int, num_classes: int = 10) -> tuple[int, int]:
    """(parameter count, buffer bytes at float32 running stats) of a DenseNet-BC, torchvision's layout."""
    n = (depth - 4) // 6
    k = growth_rate
    channels = 2 * k
    params = 3 * channels * 9  # conv0, 3x3
    stats = 0  # running mean + var entries
    batch_counters = 0  # num_batches_tracked, int64
    for block in range(3):
        for _ in range(n):
            params += 2 * channels + channels * 4 * k + 2 * 4 * k + 4 * k * k * 9
            stats += 2 * channels + 2 * 4 * k
            batch_counters += 2
            channels += k
        if block < 2:
            params += 2 * channels + channels * (channels // 2)
            stats += 2 * channels
            batch_counters += 1
            channels //= 2
    params += 2 * channels + channels * num_classes + num_classes  # norm5, classifier
    stats += 2 * channels
    batch_counters += 1
    return params, stats * 4 + batch_counters * 8


def bc_state_bytes(depth: int, growth_rate: int, element_size: int = 4) -> int:
    """Parameters, gradients and SGD momentum (3 copies of the parameters) plus BN buffers."""
    params, buffers = bc_counts(depth, growth_rate)
    return 3 * params * element_size + buffers


def bc_depths(n_max: int) -> list[int]:
    return [6 * n + 4 for n in range(1, n_max + 1)]


def _bc_model(kind: str, depth: int, growth_rate: int) -> nn.Module:
    if kind.startswith("densenet_fast"):
        from .builders import densenet_bc

        model = densenet_bc(depth, growth_rate)
        backend = kind[len("densenet_fast["):-1] if "[" in kind else None
        return Pinned(model, backend) if backend else model
    return torchvision_densenet_bc(depth, growth_rate, memory_efficient=kind.endswith("memory_efficient"))


def measure_step_transient(kind: str, depth: int, growth_rate: int, batch: int, size: int,
                           device: torch.device) -> float:
    """Peak bytes one SGD-momentum training step allocates above the model's state; inf when CUDA runs out."""
    torch.manual_seed(0)
    model = _bc_model(kind, depth, growth_rate).to(device).train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    optimizer.step()  # creates the momentum buffers (zero gradients: the weights don't move)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step(model=model, optimizer=optimizer, x=x, y=y) -> None:
        optimizer.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    try:
        if device.type == "cuda":
            step()  # warm-up: kernels, cuDNN workspaces, allocator
        peak = float(peak_memory(step, device))
    except torch.cuda.OutOfMemoryError:
        peak = float("inf")
    del step, model, optimizer, x, y  # free them (and the cached blocks) before the next depth
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return peak


@dataclass
class MaxDepthResult:
    kind: str
    depth: int  # 0 when not even the smallest depth fits
    parameters: int
    state_bytes: int
    input_bytes: int
    transient_bytes: float
    next_depth_bytes: float  # estimated total of the next DenseNet-BC depth (the first that does not fit)
    measured: bool  # True: the transient is measured at the requested batch (CUDA or a small batch)
    verified_depth: int
    fit_error: float  # measured / fitted transient at verified_depth, minus 1
    seconds: float

    @property
    def total_bytes(self) -> float:
        return self.state_bytes + self.input_bytes + self.transient_bytes


def _quadratic_fit(depths: list[int], values: list[float]):
    """Least-squares a + b*d + c*d^2 with b, c >= 0 (memory does not shrink as a net deepens)."""
    import numpy as np

    d = np.asarray(depths, dtype=float)
    v = np.asarray(values, dtype=float)
    for columns in ([0, 1, 2], [0, 1], [0]):
        design = np.stack([d ** p for p in columns], 1)
        coef = np.linalg.lstsq(design, v, rcond=None)[0]
        if all(c >= 0 for c in coef[1:]):
            full = [0.0, 0.0, 0.0]
            for p, c in zip(columns, coef):
                full[p] = float(c)
            return lambda x, f=full: f[0] + f[1] * x + f[2] * x * x
    raise AssertionError("unreachable: a constant fit has no slope to constrain")


def _largest_fitting_n(total: Callable[[int], float], budget: float) -> int:
    """Largest n >= 0 with total(6n + 4) <= budget (n = 0: none fits), for an increasing ``total``."""
    if total(10) > budget:
        return 0
    lo, hi = 1, 2
    while total(6 * hi + 4) <= budget:
        lo, hi = hi, hi * 2
        if hi > 1 << 20:
            raise ValueError("the budget is so large that no depth reaches it (the fit does not grow)")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(6 * mid + 4) <= budget else (lo, mid)
    return lo


def _available_ram() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return float("inf")


def max_depth(kind: str, budget: float, growth_rate: int, batch: int, size: int, device: torch.device,
              fit_depths: tuple[int, ...] = (40, 100, 250), verify_max_depth: Optional[int] = None,
              verify_rounds: int = 2, progress: Optional[Callable[[str], None]] = None) -> MaxDepthResult:
    """The deepest DenseNet-BC(k=growth_rate) of ``kind`` whose training step fits in ``budget`` bytes.

    The fit is checked at the answer, or at ``verify_max_depth`` when the answer is deeper (a CPU
    step at depth 3000 takes minutes), and on CPU at most at the depth that fits in half of the
    free RAM. The check's measured/fitted ratio then scales the fitted transient.
    """
    start = time.perf_counter()
    device = torch.device(device)
    say = progress or (lambda message: None)
    # CPU: measure at batches 1 and 2 and extrapolate, unless the requested batch is that small already.
    small = [batch] if device.type == "cuda" or batch <= 2 else [1, 2]
    input_bytes = batch * 3 * size * size * 4 + batch * 8

    fixed, per_image = [], []
    for d in fit_depths:
        say(f"measuring depth {d}")
        t = [measure_step_transient(kind, d, growth_rate, b, size, device) for b in small]
        if len(t) == 1:
            fixed.append(0.0), per_image.append(t[0] / batch)
        else:  # t = fixed + b * per_image at b = 1, 2
            per_image.append(t[1] - t[0]), fixed.append(max(0.0, 2 * t[0] - t[1]))
    fit_fixed, fit_per_image = _quadratic_fit(list(fit_depths), fixed), _quadratic_fit(list(fit_depths), per_image)
    correction = 1.0

    def fitted(d: int, b: int) -> float:
        return fit_fixed(d) + b * fit_per_image(d)

    def total(d: int) -> float:
        return bc_state_bytes(d, growth_rate) + input_bytes + correction * fitted(d, batch)

    cap = verify_max_depth or float("inf")
    if device.type == "cpu":
        ram = _available_ram() / 2
        cap = min(cap, 6 * _largest_fitting_n(lambda d: bc_state_bytes(d, growth_rate) + fitted(d, small[0]), ram) + 4)
    verified, fit_error = 0, 0.0
    n = _largest_fitting_n(total, budget)
    for _ in range(verify_rounds):
        d = min(6 * n + 4, 6 * ((cap - 4) // 6) + 4)
        if n == 0 or d == verified or d < 10:
            break
        say(f"checking the fit at depth {d}")
        t = measure_step_transient(kind, d, growth_rate, small[0], size, device)
        expected = fitted(d, small[0])
        correction = t / expected if expected > 0 else 1.0
        verified, fit_error = d, correction - 1.0
        n = _largest_fitting_n(total, budget)
    depth = 6 * n + 4 if n else 0
    return MaxDepthResult(kind, depth, bc_counts(depth, growth_rate)[0] if depth else 0,
                          bc_state_bytes(depth, growth_rate) if depth else 0, input_bytes,
                          correction * fitted(depth, batch) if depth else 0.0, total(6 * (n + 1) + 4),
                          len(small) == 1, verified, fit_error, time.perf_counter() - start)
