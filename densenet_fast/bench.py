"""Peak memory and step time of a set of models on one input, measured in one run, and their tables.

The set is ``comparison.comparison_models``'s; ``densenet-fast bench`` (bench_command.py),
``tools/gpu_check.py`` and ``benchmarks/core_benchmark.py`` time it here. A step is forward,
``.sum().backward()``. Each model gets a warm-up step first, so parameter gradients already exist
and the peak counts activations and transients, as in a training loop that zeroes gradients in
place. Timing follows torch.utils.benchmark's rules: warm-up rounds that are not timed, then timed
rounds until the interquartile range (IQR) is under 10% of the median (its "could indicate system
fluctuation" threshold) or the time limit is spent, and the median and IQR are its
``Measurement``'s. The rounds are interleaved across models, so a noisy neighbour on a shared
machine slows every model alike.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.utils.benchmark import Measurement, TaskSpec

from .comparison import BASELINE
from .memory import MiB, peak_memory

IQR_THRESHOLD = 0.1  # torch.utils.benchmark's _IQR_WARN_THRESHOLD: above it, "system fluctuation"


@dataclass
class StepResult:
    name: str
    peak_bytes: int
    step_times: list[float] = field(default_factory=list)
    images: int = 0  # per step (the batch), for the throughput

    @property
    def measurement(self) -> Optional[Measurement]:
        if not self.step_times:
            return None
        return Measurement(number_per_run=1, raw_times=list(self.step_times), task_spec=TaskSpec(self.name, "pass"))

    @property
    def step_time(self) -> float:
        m = self.measurement
        return m.median if m else float("nan")

    @property
    def iqr(self) -> float:
        m = self.measurement
        return m.iqr if m else float("nan")

    @property
    def throughput(self) -> float:
        """Images per second at the median step time."""
        return self.images / self.step_time if self.images else float("nan")

    @property
    def stable(self) -> bool:
        m = self.measurement
        return bool(m) and len(self.step_times) >= 4 and m.meets_confidence(IQR_THRESHOLD)


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


def compare_steps(models: dict[str, nn.Module], x: torch.Tensor, rounds: int = 5,
                  autocast_dtype: Optional[torch.dtype] = None,
                  progress: Optional[Callable[[str], None]] = None, warmup: int = 1,
                  max_time: Optional[float] = None, bar=None,
                  timer: Callable[[], float] = time.perf_counter) -> list[StepResult]:
    """Peak memory and step times of each model on the same input, measured in one run.

    ``warmup`` untimed rounds, then at least ``rounds`` timed ones (0: memory only); with ``max_time``
    (seconds of timed rounds), more rounds until every model's IQR is under 10% of its median.
    ``bar`` (a tqdm) moves one step per training step run; its total grows with added rounds.
    ``timer``: seconds, as torch.utils.benchmark.Timer's argument of that name.
    """
    results: list[StepResult] = []
    steps = {}

    def ran(count: int = 1) -> None:
        if bar is not None:
            bar.update(count)

    for name, model in models.items():
        if progress:
            progress(f"{name}: warm-up and peak memory")
        model.train()
        step = make_step(model, x, autocast_dtype)
        step()  # warm-up: allocator, kernels, parameter gradients
        _sync(x.device)
        ran()
        results.append(StepResult(name, peak_memory(step, x.device), images=x.shape[0]))
        ran()
        steps[name] = step
    if rounds < 1:
        return results
    for r in range(warmup):
        if progress:
            progress(f"warm-up round {r + 1}/{warmup}")
        for result in results:
            steps[result.name]()
            ran()
    _sync(x.device)
    timed, r = 0.0, 0
    while r < rounds or (max_time is not None and timed < max_time and not all(x.stable for x in results)):
        r += 1
        if r > rounds and bar is not None:
            bar.total += len(results)
            bar.refresh()
        if progress:
            progress(f"timing round {r}" + (f"/{rounds}" if r <= rounds else " (until the IQR is < 10%)"))
        for result in results:
            start = timer()
            steps[result.name]()
            _sync(x.device)
            result.step_times.append(timer() - start)
            timed += result.step_times[-1]
            ran()
    return results


def planned_steps(n_models: int, rounds: int, warmup: int) -> int:
    """Training steps ``compare_steps`` runs before any added round."""
    return n_models * (2 + (warmup + rounds if rounds else 0))


def format_table(results: list[StepResult], baseline: str) -> str:
    """A markdown table with ratios against the result named ``baseline``."""
    base = next(r for r in results if r.name == baseline)
    lines = [f"| model | peak memory | vs {baseline} | step time (median) | IQR | images/s | vs {baseline} |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        noisy = "" if r.stable else " (noisy)" if len(r.step_times) >= 4 else " (< 4 runs)"
        lines.append(f"| {r.name} | {r.peak_bytes / MiB:.0f} MiB | {r.peak_bytes / base.peak_bytes:.3f}x "
                     f"| {r.step_time:.3f} s | {r.iqr:.3f} s ({r.iqr / r.step_time:.0%}){noisy} "
                     f"| {r.throughput:.1f} | {r.step_time / base.step_time:.3f}x |")
    return "\n".join(lines)


def results_rows(results: list[StepResult], baseline: str = BASELINE) -> list[dict]:
    """One dict per result with ratios against ``baseline`` (for JSON/CSV output)."""
    base = next(r for r in results if r.name == baseline)
    return [{"model": r.name, "peak_bytes": r.peak_bytes, "peak_mib": round(r.peak_bytes / MiB, 2),
             "memory_vs_baseline": round(r.peak_bytes / base.peak_bytes, 4),
             "step_time_s": round(r.step_time, 4), "iqr_s": round(r.iqr, 4), "stable": r.stable,
             "images_per_s": float(f"{r.throughput:.4g}"), "time_vs_baseline": round(r.step_time / base.step_time, 4),
             "step_times_s": [round(t, 4) for t in r.step_times]} for r in results]
