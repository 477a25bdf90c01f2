"""``densenet-fast max-depth``: the deepest DenseNet-BC whose training step fits in a memory budget.

total(depth) = state(depth) + input + transient(depth, batch), where
  state      = parameters + buffers + gradients + SGD momentum buffers, counted exactly from the
               architecture (no model is built for it);
  transient  = the peak of what one training step (forward, cross-entropy, backward, SGD step)
               allocates on top of that: activations, saved tensors, temporaries.
The transient part is measured at a few small depths, fitted with a quadratic in depth, the budget
equation is solved on the fit, and the answer is measured again ("verified") to correct the fit.
On CUDA every measurement is at the requested batch (torch.cuda.max_memory_allocated). On CPU the
profiler measures batches 1 and 2, transient = fixed + batch * per_image, so the answer is an
estimate for the requested batch. The ``densenet-fast max-depth`` command around it is in
max_depth_command.py.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .comparison import BASELINE, MEMORY_EFFICIENT, Pinned, torchvision_densenet_bc
from .memory import peak_memory

MAX_DEPTH_KINDS = (BASELINE, MEMORY_EFFICIENT)


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


def _measured_batches(device: torch.device, batch: int) -> list[int]:
    """CPU: measure at batches 1 and 2 and extrapolate, unless the requested batch is that small already."""
    return [batch] if device.type == "cuda" or batch <= 2 else [1, 2]


def _transient_parts(kind: str, depth: int, growth_rate: int, batch: int, size: int,
                     device: torch.device) -> tuple[float, float]:
    """(fixed, per image) bytes of a training step's transient: measured at ``batch`` (fixed 0), or on CPU at
    batches 1 and 2 (t = fixed + b * per_image)."""
    t = [measure_step_transient(kind, depth, growth_rate, b, size, device) for b in _measured_batches(device, batch)]
    if len(t) == 1:
        return 0.0, t[0] / batch
    return max(0.0, 2 * t[0] - t[1]), t[1] - t[0]


def floor_bytes(growth_rate: int, batch: int, size: int) -> int:
    """A lower bound on any kind's training step at the smallest depth (10), from the architecture alone:
    its state, the input batch, and the first block's features (the stem's 2k channels and the layer's k:
    both are alive until the transition, in every implementation)."""
    features = batch * 3 * growth_rate * size * size * 4
    return bc_state_bytes(10, growth_rate) + batch * (3 * size * size * 4 + 8) + features


def smallest_total(kind: str, growth_rate: int, batch: int, size: int, device: torch.device) -> float:
    """Measured bytes of ``kind``'s training step at depth 10, the smallest DenseNet-BC (a fraction of a second)."""
    fixed, per_image = _transient_parts(kind, 10, growth_rate, batch, size, device)
    return bc_state_bytes(10, growth_rate) + batch * (3 * size * size * 4 + 8) + fixed + batch * per_image


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
    small = _measured_batches(device, batch)
    input_bytes = batch * 3 * size * size * 4 + batch * 8
    smallest = smallest_total(kind, growth_rate, batch, size, device)
    if smallest > budget:  # not even depth 10 fits: nothing to fit
        return MaxDepthResult(kind, 0, 0, 0, input_bytes, 0.0, smallest, len(small) == 1, 0, 0.0,
                              time.perf_counter() - start)

    fixed, per_image = [], []
    for d in fit_depths:
        say(f"measuring depth {d}")
        f, p = _transient_parts(kind, d, growth_rate, batch, size, device)
        fixed.append(f), per_image.append(p)
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
