"""Peak memory of a piece of work, measured the same way for every model in a comparison.

CPU: the peak of live tensor bytes, from the profiler's allocation and free events (a running sum
of their signed sizes). CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before.
Either way only what the work allocates counts, not tensors that already existed.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile


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
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.device_type() == torch.autograd.DeviceType.CPU
              and e.nbytes() != 0]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak
