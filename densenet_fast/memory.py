"""Peak memory of a piece of work, measured the same way for every model in a comparison.

CPU: the peak of live tensor bytes, from the profiler's allocation and free events (a running sum
of their signed sizes). CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before.
Either way only what the work allocates counts, not tensors that already existed (``peak_memory``);
``activation_peak`` and ``training_memory`` apply it to a model's training step.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

MiB = 1 << 20

# What the CPU profiler (Kineto) logs from C++ straight to file descriptor 2 when it starts and stops:
# 'profiler_start', 'profiler_stop', 'gpuGetDeviceCount failed' on a machine without a GPU...
_KINETO_LOG = re.compile(rb"^(STAGE|USDT|ERROR|WARNING|INFO):\d{4}-\d\d-\d\d [0-9:]+ \d+:\d+ \w+\.cpp:\d+\]"
                         rb"|^\[W\d+ [0-9:.]+ CPUAllocator\.cpp:\d+\] Memory block of unknown size")


@contextlib.contextmanager
def _without_kineto_log() -> Iterator[None]:
    """fd 2 goes to a temporary file while the profiler starts or stops (no other code runs then);
    fd 2 is restored in ``finally`` and every line that is not Kineto's log is written back to it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture:
                if not _KINETO_LOG.match(line):
                    os.write(2, line)


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Run ``fn()`` once and return the peak of the bytes it had allocated at any moment."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        raise ValueError(f"peak_memory measures 'cpu' or 'cuda' devices, got {device.type!r}")
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _without_kineto_log():
        prof.__enter__()
    try:
        fn()  # with the real fd 2: whatever the work writes, a crash included, reaches stderr at once
    finally:
        with _without_kineto_log():
            prof.__exit__(None, None, None)
    events = [e for e in prof.profiler.kineto_results.events() if e.device_type() == torch.autograd.DeviceType.CPU
              and e.nbytes() != 0]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def activation_peak(model: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes of one training step (forward, ``.float().sum().backward()``: bench.make_step's step)
    after a warm-up step, so parameter gradients already exist and only activations and transients count."""
    model.train()

    def step() -> None:
        model(x).float().sum().backward()

    step()
    return peak_memory(step, x.device)


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
