"""The dense-block algorithm: a whole dense block (and the transition after it) as one autograd node.

Forward
    One feature buffer N x (C0 + L*k) x H x W per block. The block input is copied into its first C0
    channels and every layer writes its k new channels into its own slice: no torch.cat. The batch
    mean and variance of a buffer channel are computed once, when the channel is written, and reused
    by every later BN that reads it (each with its own weight, bias, eps and running stats). Saved
    for backward: the buffer, the per-channel statistics and the small per-layer BN coefficients.

Backward
    One gradient buffer G of the block's size. Layers are walked in reverse; each recomputes its
    bottleneck from the buffer and adds ``scale * dy`` into G's prefix. BN's backward through the
    batch statistics is linear in dy with per-channel coefficients,

        dx = scale * dy + coef_x * (x - mean) + coef_c,
        coef_x = -scale * invstd * sum(dy * xhat) / M,   coef_c = -scale * sum(dy) / M,

    so the coefficients of every BN that read a channel are summed and applied to G once, when the
    walk reaches the layer that wrote the channel (all of its readers are done by then).

The arithmetic over tensors goes through the backend's op interface (``ops/interface.py``); this
module only does per-channel bookkeeping. Layers and transitions are duck-typed modules with
torchvision's attributes (``norm1, conv1, norm2, conv2, drop_rate`` and ``norm, conv``).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from .ops import backend_for
from .ops.interface import Backend, stats_dtype
from .sync import BatchSync, active_group

_PARAMS_PER_LAYER = 6  # norm1.weight, norm1.bias, conv1.weight, norm2.weight, norm2.bias, conv2.weight
_PARAMS_PER_TRANSITION = 3  # norm.weight, norm.bias, conv.weight


class Stage:
    """What one autograd node computes: a dense block's layers, then optionally a transition.

    ``memory_efficient=False`` keeps each layer's bottleneck (conv1 output) for backward instead
    of recomputing it: more memory, one conv1x1 less per layer in backward.
    """

    def __init__(self, layers: Sequence[nn.Module], transition: Optional[nn.Module], memory_efficient: bool = True,
                 name: str = "dense block", sync_batchnorm: bool = False, process_group=None):
        if not layers and transition is None:
            raise ValueError("a stage needs at least one dense layer or a transition")
        self.name = name  # for error messages, e.g. 'features.denseblock2 + features.transition2'
        # SyncBatchNorm semantics across process_group (None: the default group) when distributed.
        self.sync_batchnorm, self.process_group = sync_batchnorm, process_group
        self.layers = list(layers)
        self.transition = transition
        self.memory_efficient = memory_efficient
        self.in_channels = (
            self.layers[0].norm1.num_features if self.layers else transition.norm.num_features
        )
        self.growth_rate = self.layers[0].conv2.out_channels if self.layers else 0

    def any_batch_stats(self) -> bool:
        """Whether any BN of the stage (bottlenecks included) normalizes with batch statistics."""
        return self.reads_batch_stats() or any(_uses_batch_stats(layer.norm2) for layer in self.layers)

    def reads_batch_stats(self) -> bool:
        """Whether any BN reading the buffer normalizes with batch statistics."""
        norms = [layer.norm1 for layer in self.layers]
        if self.transition is not None:
            norms.append(self.transition.norm)
        return any(_uses_batch_stats(m) for m in norms)

    def params(self) -> list[Optional[Tensor]]:
        flat: list[Optional[Tensor]] = []
        for layer in self.layers:
            flat += [layer.norm1.weight, layer.norm1.bias, layer.conv1.weight,
                     layer.norm2.weight, layer.norm2.bias, layer.conv2.weight]
        if self.transition is not None:
            t = self.transition
            flat += [t.norm.weight, t.norm.bias, t.conv.weight]
        return flat


class _BN(NamedTuple):
    """One BN as the ops see it: relu(x * scale + shift); backward reduces around ``center``."""

    scale: Tensor
    shift: Tensor
    center: Tensor
    invstd: Tensor
    batch_stats: bool  # normalized with batch statistics (so backward goes through them)


def _uses_batch_stats(norm: nn.BatchNorm2d) -> bool:
    # torch.nn.BatchNorm's rule: batch statistics in training, or when no running stats are kept.
    return norm.training or norm.running_mean is None


def _update_running_stats(norm: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    """torch.nn.BatchNorm's update: unbiased variance, ``momentum`` or a cumulative average."""
    if not (norm.training and norm.track_running_stats and norm.running_mean is not None):
        return
    if norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
    if norm.momentum is None:
        factor = 1.0 / float(norm.num_batches_tracked)
    else:
        factor = norm.momentum
    rm, rv = norm.running_mean, norm.running_var
    rm.mul_(1.0 - factor).add_(mean.to(rm.dtype), alpha=factor)
    rv.mul_(1.0 - factor).add_((var * (count / (count - 1))).to(rv.dtype), alpha=factor)


def _normalize(norm: nn.BatchNorm2d, weight, bias, mean, var, count: int, sdt: torch.dtype) -> _BN:
    """The BN coefficients of ``norm`` over channels with batch ``mean``/``var``; updates running stats."""
    if _uses_batch_stats(norm):
        if count <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {count} (batch x height x width)"
            )
        _update_running_stats(norm, mean, var, count)
        batch = True
    else:
        mean, var = norm.running_mean.to(sdt), norm.running_var.to(sdt)
        batch = False
    invstd = torch.rsqrt(var + norm.eps)
    scale = invstd if weight is None else weight.detach().to(sdt) * invstd
    shift = -mean * scale if bias is None else bias.detach().to(sdt) - mean * scale
    return _BN(scale, shift, mean, invstd, batch)


def _param_grads(bn: _BN, sum_dy: Tensor, sum_dy_xc: Tensor, weight, bias):
    grad_w = (bn.invstd * sum_dy_xc).to(weight.dtype) if weight is not None else None
    grad_b = sum_dy.to(bias.dtype) if bias is not None else None
    return grad_w, grad_b


def _w(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """A conv weight in the activations' dtype (a cast only under autocast)."""
    return weight.detach().to(dtype)


def _grad_as(grad: Optional[Tensor], param: Tensor) -> Optional[Tensor]:
    return None if grad is None else grad.to(param.dtype)


def _batch_coefs(bn: _BN, sum_dy: Tensor, sum_dy_xc: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """coef_x, coef_c of the backward through the batch statistics (see the module docstring)."""
    coef_x = -bn.scale * bn.invstd * bn.invstd * sum_dy_xc / count
    coef_c = -bn.scale * sum_dy / count
    return coef_x, coef_c


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _check_input(x: Tensor, stage: Stage, params: Sequence[Optional[Tensor]], autocast: bool) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected a 4-D input (N, C, H, W), got {shape}")
    if x.shape[1] != stage.in_channels:
        raise ValueError(f"expected an input with {stage.in_channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    ref = next(p for p in params if p is not None)
    if not x.is_floating_point() or (x.dtype != ref.dtype and not autocast):
        raise TypeError(f"expected input dtype {ref.dtype} (the parameters' dtype), got {x.dtype}")
    if x.device != ref.device:
        raise RuntimeError(f"expected input on {ref.device} (the parameters' device), got {x.device}")
    if stage.transition is not None and (x.shape[2] < 2 or x.shape[3] < 2):
        raise ValueError(f"a transition pools 2x2: expected H and W of at least 2, got {tuple(x.shape[2:])}")


def _forward(backend: Backend, x: Tensor, stage: Stage, params: Sequence[Optional[Tensor]], for_backward: bool):
    n, c0, h, w = x.shape
    k, num_layers = stage.growth_rate, len(stage.layers)
    channels = c0 + num_layers * k
    sdt = stats_dtype(x.dtype)
    need_stats = stage.reads_batch_stats()
    sync_on, group = active_group(stage.sync_batchnorm and stage.any_batch_stats(), stage.process_group)
    sync = BatchSync(group, n * h * w, x.device) if sync_on else None
    count = sync.total if sync else n * h * w  # values per channel that BN's statistics cover

    if num_layers == 0:
        buf = x
    else:
        buf = torch.empty((n, channels, h, w), dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
        buf[:, :c0].copy_(x)
    mean = torch.zeros(channels, dtype=sdt, device=x.device)
    var = torch.ones(channels, dtype=sdt, device=x.device)
    if need_stats:
        mean[:c0], var[:c0] = _stats(backend.channel_stats(x), sync)

    records = []  # per layer: (bn1, bn2, dropout keep-mask or None, kept bottleneck or None)
    for i, layer in enumerate(stage.layers):
        c = c0 + i * k
        w1, b1, conv1, w2, b2, conv2 = params[i * _PARAMS_PER_LAYER:(i + 1) * _PARAMS_PER_LAYER]
        bn1 = _normalize(layer.norm1, w1, b1, mean[:c], var[:c], count, sdt)
        need_z_stats = _uses_batch_stats(layer.norm2)
        z, z_mean, z_var = backend.bn_relu_conv1x1(buf[:, :c], bn1.scale, bn1.shift, _w(conv1, x.dtype), need_z_stats)
        if need_z_stats:
            z_mean, z_var = _stats((z_mean, z_var), sync)
        bn2 = _normalize(layer.norm2, w2, b2, z_mean, z_var, count, sdt)
        noise = None
        if layer.training and layer.drop_rate > 0:
            # F.dropout's CPU formula and RNG use, so a seeded run matches torchvision's masks.
            p = float(layer.drop_rate)
            noise = torch.empty((n, k, h, w), dtype=x.dtype, device=x.device).bernoulli_(1 - p)
            noise.div_(1 - p) if p < 1 else noise.zero_()
        f_mean, f_var = backend.bn_relu_conv3x3(z, bn2.scale, bn2.shift, _w(conv2, x.dtype), buf[:, c:c + k], noise, need_stats)
        if need_stats:
            mean[c:c + k], var[c:c + k] = _stats((f_mean, f_var), sync)
        if for_backward:
            keep = noise.ne(0) if noise is not None else None
            records.append((bn1, bn2, keep, None if stage.memory_efficient else z))
        del z, noise

    bnt = None
    out = buf
    if stage.transition is not None:
        wt, bt, convt = params[num_layers * _PARAMS_PER_LAYER:]
        bnt = _normalize(stage.transition.norm, wt, bt, mean, var, count, sdt)
        out = backend.bn_relu_pool_conv1x1(buf, bnt.scale, bnt.shift, _w(convt, x.dtype))
    return out, buf, mean, records, bnt, sync


def _stats(mean_var: tuple[Tensor, Tensor], sync: Optional[BatchSync]) -> tuple[Tensor, Tensor]:
    return mean_var if sync is None else sync.stats(*mean_var)


class _DenseStageFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, stage: Stage, *params):
        backend = backend_for(x)
        out, buf, mean, records, bnt, sync = _forward(backend, x, stage, params, for_backward=True)
        masks = [r[2] for r in records]
        zs = [r[3] for r in records]
        ctx.save_for_backward(buf, mean, *masks, *zs)
        ctx.stage, ctx.bns, ctx.bnt, ctx.backend = stage, [(r[0], r[1]) for r in records], bnt, backend
        ctx.in_channels, ctx.x_format = x.shape[1], _memory_format(x)
        ctx.reads_batch_stats = stage.reads_batch_stats()
        ctx.sync = sync
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with _out_of_memory_names(ctx.stage, ctx.saved_tensors[0], "backward"):
            return _DenseStageFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        stage: Stage = ctx.stage
        num_layers = len(stage.layers)
        buf, mean, *rest = ctx.saved_tensors
        masks, zs = rest[:num_layers], rest[num_layers:]
        needs = ctx.needs_input_grad[2:]
        backend: Backend = ctx.backend  # the forward's, whatever is pinned now
        n, channels, h, w = buf.shape
        sync: Optional[BatchSync] = ctx.sync
        count = sync.total if sync else n * h * w
        k, c0 = stage.growth_rate, ctx.in_channels
        act = buf.dtype  # activations' dtype (the autocast dtype under autocast)
        grads: list[Optional[Tensor]] = [None] * len(needs)
        reads_batch_stats = ctx.reads_batch_stats
        coef_x = torch.zeros_like(mean)
        coef_c = torch.zeros_like(mean)

        if stage.transition is not None:
            t, bnt, base = stage.transition, ctx.bnt, num_layers * _PARAMS_PER_LAYER
            r = backend.bn_relu_pool_conv1x1_backward(
                grad_out, buf, bnt.scale, bnt.shift, _w(t.conv.weight, act), bnt.center, None, needs[base + 2])
            grad_buf = r.grad_x
            grads[base], grads[base + 1] = _param_grads(bnt, r.sum_dy, r.sum_dy_xc, t.norm.weight, t.norm.bias)
            grads[base + 2] = _grad_as(r.grad_weight, t.conv.weight)
            if bnt.batch_stats:
                cx, cc = _batch_coefs(bnt, r.sum_dy, r.sum_dy_xc, count)
                coef_x += cx
                coef_c += cc
            del r
        else:
            grad_buf = torch.empty_like(buf)
            grad_buf.copy_(grad_out)

        for i in reversed(range(num_layers)):
            layer = stage.layers[i]
            c, base = c0 + i * k, i * _PARAMS_PER_LAYER
            new = slice(c, c + k)
            bn1, bn2 = ctx.bns[i]
            if reads_batch_stats:
                # Every reader of channels [c, c+k) is done: apply their batch-statistics terms once.
                if sync:
                    sync.sum_(coef_x[new], coef_c[new])
                backend.bn_grad_finalize(grad_buf[:, new], buf[:, new], mean[new], coef_x[new], coef_c[new])
            grad_new = grad_buf[:, new]
            if masks[i] is not None:
                p = float(layer.drop_rate)
                grad_new = grad_new * masks[i] * (1.0 / (1.0 - p) if p < 1 else 0.0)
            z = zs[i]
            if z is None:
                z = backend.bn_relu_conv1x1(buf[:, :c], bn1.scale, bn1.shift, _w(layer.conv1.weight, act), False)[0]
            r2 = backend.bn_relu_conv3x3_backward(
                grad_new, z, bn2.scale, bn2.shift, _w(layer.conv2.weight, act), bn2.center, None, needs[base + 5])
            del grad_new
            grads[base + 3], grads[base + 4] = _param_grads(bn2, r2.sum_dy, r2.sum_dy_xc, layer.norm2.weight, layer.norm2.bias)
            grads[base + 5] = _grad_as(r2.grad_weight, layer.conv2.weight)
            grad_z = r2.grad_x
            if bn2.batch_stats:
                sums = (r2.sum_dy.clone(), r2.sum_dy_xc.clone())
                if sync:
                    sync.sum_(*sums)  # parameter grads above stay local, as in torch's SyncBatchNorm
                backend.bn_grad_finalize(grad_z, z, bn2.center, *_batch_coefs(bn2, *sums, count))
            del z, r2
            r1 = backend.bn_relu_conv1x1_backward(
                grad_z, buf[:, :c], bn1.scale, bn1.shift, _w(layer.conv1.weight, act), bn1.center,
                grad_buf[:, :c], needs[base + 2])
            del grad_z
            grads[base], grads[base + 1] = _param_grads(bn1, r1.sum_dy, r1.sum_dy_xc, layer.norm1.weight, layer.norm1.bias)
            grads[base + 2] = _grad_as(r1.grad_weight, layer.conv1.weight)
            if bn1.batch_stats:
                cx, cc = _batch_coefs(bn1, r1.sum_dy, r1.sum_dy_xc, count)
                coef_x[:c] += cx
                coef_c[:c] += cc
            del r1

        if reads_batch_stats:
            if sync:
                sync.sum_(coef_x[:c0], coef_c[:c0])
            backend.bn_grad_finalize(grad_buf[:, :c0], buf[:, :c0], mean[:c0], coef_x[:c0], coef_c[:c0])
        grad_x = grad_buf if num_layers == 0 else grad_buf[:, :c0].clone(memory_format=ctx.x_format)
        grads = [g if need else None for g, need in zip(grads, needs)]
        return (grad_x if ctx.needs_input_grad[0] else None, None, *grads)


_OOM_MESSAGES = ("out of memory", "not enough memory", "can't allocate memory")


@contextlib.contextmanager
def _out_of_memory_names(stage: Stage, x: Tensor, phase: str):
    """Re-raise running out of memory with the block, the batch and what to do about it."""
    try:
        yield
    except RuntimeError as err:  # torch.OutOfMemoryError is a RuntimeError; so is CPU allocation failure
        if not any(m in str(err) for m in _OOM_MESSAGES):
            raise
        n, _, h, w = x.shape
        raise type(err)(
            f"densenet_fast ran out of memory in the {phase} of {stage.name} (batch {n}, {h}x{w}, {x.dtype}); "
            f"try a smaller batch or a smaller input. Original error: {err}"
        ) from None


def dense_stage(x: Tensor, stage: Stage) -> Tensor:
    """Run ``stage`` on ``x``: the block's feature buffer, or the transition's output if it has one.

    Under torch.autocast the activations and conv weights are in the autocast dtype (as
    torchvision's convs and BNs produce them) while statistics and BN math stay in float32.
    """
    params = stage.params()
    device_type = x.device.type if isinstance(x, Tensor) else "cpu"
    autocast = torch.is_autocast_enabled(device_type)
    _check_input(x, stage, params, autocast)
    if autocast:
        x = x.to(torch.get_autocast_dtype(device_type))
    # The ops cast for themselves; autocast inside them would re-cast every call (and rejects out=).
    with torch.autocast(device_type, enabled=False), _out_of_memory_names(stage, x, "forward"):
        if torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params)):
            return _DenseStageFunction.apply(x, stage, *params)
        with torch.no_grad():
            return _forward(backend_for(x), x, stage, params, for_backward=False)[0]
