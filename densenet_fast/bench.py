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
