"""Synchronized batch statistics across the processes of a group (SyncBatchNorm semantics).

Used by the block algorithm (``stage_algorithm.py``), which calls these at the few places BN needs
global numbers: a channel's statistics once when it is written (merged from every process's mean
and variance, weighted by their counts: stable when the mean is large), a bottleneck's statistics
per layer, and in backward the accumulated per-channel coefficients once per channel. Parameter
gradients stay local, as with torch.nn.SyncBatchNorm; DistributedDataParallel averages them.

Nothing here reads a tensor back to the host: the global count stays a tensor (``total``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .bn_math import chan_merge


def active_group(enabled: bool, group) -> tuple[bool, Optional[object]]:
    """Whether to synchronize now: asked for, a process group is up, and it has several processes."""
    if not enabled or not (dist.is_available() and dist.is_initialized()):
        return False, None
    return dist.get_world_size(group) > 1, group


class BatchSync:
    """Collectives over one stage's batch; every process calls them in the same order."""

    def __init__(self, group, local_count: int, device: torch.device):
        self.group = group
        self.world = dist.get_world_size(group)
        counts = self._gather(torch.full((1,), float(local_count), dtype=torch.float64, device=device))
        self.counts = counts.reshape(-1)  # one per process
        self.total = self.counts.sum()  # a 0-dim float64 tensor

    def total_count(self) -> int:
        """The global count as a Python int: a host sync, for error checks only."""
        return int(self.total.item())

    def _gather(self, t: Tensor) -> Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.stack(parts)

    def stats(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """Global mean and biased variance from every process's (bn_math.chan_merge: Chan's parallel merge)."""
        g = self._gather(torch.stack([mean, var]))  # world x 2 x C
        return chan_merge(self.counts, g[:, 0], g[:, 1], self.total)

    def sum(self, *tensors: Tensor) -> list[Tensor]:
        """Each tensor summed over the processes, as new tensors (one collective for all)."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.group)
        out, offset = [], 0
        for t in tensors:
            out.append(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        return out
