"""Distributed training helpers: synchronized BatchNorm for densenet_fast models."""
from __future__ import annotations

import copy

import torch
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

from .models import _DenseBlock, _Transition
from .sync import active_group


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over the batch of every process of ``process_group``, on any device.

    Used for the stem's and the head's BNs (the blocks synchronize inside their own node).
    torch.nn.SyncBatchNorm refuses CPU tensors; this one differentiates through
    torch.distributed.nn's all_reduce, so it also runs on gloo. Same parameters and buffers as
    BatchNorm2d, so state_dicts are unchanged.
    """

    process_group = None

    def forward(self, x: Tensor) -> Tensor:
        batch_stats = self.training or self.running_mean is None
        sync, group = active_group(batch_stats, self.process_group)
        if not sync:
            return super().forward(x)
        self._check_input_dim(x)
        n = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        local_sum = x.sum((0, 2, 3))
        local_sq = (x * x).sum((0, 2, 3))
        total = dist_fn.all_reduce(torch.cat([n, local_sum, local_sq]), group=group)
        count = total[0]
        mean = total[1:1 + x.shape[1]] / count
        var = (total[1 + x.shape[1]:] / count - mean * mean).clamp_min(0)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                c = float(count)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * (c / (c - 1)), alpha=factor)
        normalized = (x - mean[:, None, None]) * torch.rsqrt(var + self.eps)[:, None, None]
        if self.affine:
            normalized = normalized * self.weight[:, None, None] + self.bias[:, None, None]
        return normalized


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Synchronize every BN of a densenet_fast model across ``process_group`` (default: world).

    Blocks and transitions all-reduce statistics once per new channel, not once per layer; the
    stem's and head's BNs become :class:`SyncBatchNorm2d`. Works in place and returns ``model``.
    """
    inside_blocks = set()
    for name, module in model.named_modules():
        if isinstance(module, (_DenseBlock, _Transition)):
            module.sync_batchnorm, module.process_group = True, process_group
            inside_blocks.update(f"{name}.{sub}" for sub, _ in module.named_modules() if sub)
    for name, module in list(model.named_modules()):
        if type(module) is nn.BatchNorm2d and name not in inside_blocks:
            # Same module, same tensors (dtype, device, requires_grad, mode), synchronized forward.
            synced = copy.deepcopy(module)
            synced.__class__ = SyncBatchNorm2d
            synced.process_group = process_group
            model.set_submodule(name, synced)
    return model
