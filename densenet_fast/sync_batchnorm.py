"""Distributed training helpers: synchronized BatchNorm for densenet_fast models."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .bn_math import chan_merge, coefficients, rsqrt_eps, update_running_stats
from .models import _DenseBlock, _Transition
from .ops.interface import stats_dtype
from .stage_sync import active_group


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes; the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over the batch of every process of ``process_group``, on any device.

    Used for the stem's and the head's BNs (blocks synchronize inside their own op).
    torch.nn.SyncBatchNorm refuses CPU tensors; this one runs on gloo too. Statistics are merged
    from every process's count, mean and variance in float32 or wider (Chan's parallel formula,
    ``bn_math.chan_merge``: no cancellation when the mean is large), and nothing is read back to the
    host. Coefficients and the running-stats update are bn_math's, as in the fused stages. Same
    parameters and buffers as BatchNorm2d.
    """

    process_group = None

    def forward(self, x: Tensor) -> Tensor:
        batch_stats = self.training or self.running_mean is None
        sync, group = active_group(batch_stats, self.process_group)
        if not sync:
            return super().forward(x)
        self._check_input_dim(x)
        sdt = stats_dtype(x.dtype)
        xs = x.to(sdt)
        var, mean = torch.var_mean(xs, dim=(0, 2, 3), correction=0)
        count = torch.full_like(mean[:1], xs.numel() / max(1, xs.shape[1]))
        # Every process writes its row; the sum over processes gathers all rows (differentiably).
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        rows = torch.zeros(world, 1 + 2 * mean.numel(), dtype=sdt, device=x.device)
        at_rank = torch.full((1,), rank, dtype=torch.long, device=x.device)  # a fill, not a host-to-device copy
        rows = rows.index_copy(0, at_rank, torch.cat([count, mean, var])[None])
        rows = _AllReduceSum.apply(rows, group)
        counts, means, variances = rows[:, 0], rows[:, 1:1 + mean.numel()], rows[:, 1 + mean.numel():]
        total = counts.sum()
        global_mean, global_var = chan_merge(counts, means, variances, total)
        if self.training and self.track_running_stats:
            with torch.no_grad():  # the fused stages' update: no host sync
                unbiased = global_var * (total / (total - 1))
                update_running_stats([(self.running_mean, self.running_var, self.num_batches_tracked)],
                                     [self.momentum], [(global_mean, unbiased)])
        scale, shift = coefficients(global_mean, rsqrt_eps(global_var, self.eps),
                                    None if self.weight is None else self.weight.to(sdt),
                                    None if self.bias is None else self.bias.to(sdt))
        return (xs * scale[:, None, None] + shift[:, None, None]).to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Synchronize every BN of a densenet_fast model across ``process_group`` (default: world).

    Blocks and transitions exchange statistics once per new channel, not once per layer; the
    stem's and head's BNs become :class:`SyncBatchNorm2d` in place (same module objects and
    parameters, so an optimizer built before still trains them). Returns ``model``.
    """
    inside_blocks = set()
    for name, module in model.named_modules():
        if isinstance(module, (_DenseBlock, _Transition)):
            module.sync_batchnorm, module.process_group = True, process_group
            inside_blocks.update(f"{name}.{sub}" for sub, _ in module.named_modules() if sub)
    for name, module in model.named_modules():
        if type(module) is nn.BatchNorm2d and name not in inside_blocks:
            module.__class__ = SyncBatchNorm2d
            module.process_group = process_group
    return model
