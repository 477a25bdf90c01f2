"""The dense-block algorithm: a whole dense block (and the transition after it) as one node.

Forward
    One feature buffer N x (C0 + L*k) x H x W per block. The block input is copied into its first C0
    channels and every layer writes its k new channels into its own slice: no torch.cat. The batch
    mean and variance of a buffer channel are computed once, when the channel is written, and reused
    by every later BN that reads it (each with its own weight, bias, eps and running stats). Kept
    for backward: the buffer, the per-channel statistics, the small per-BN coefficients, dropout's
    masks, and each bottleneck only with memory_efficient=False.

Backward
    One gradient buffer G of the block's size. Layers are walked in reverse; each recomputes its
    bottleneck from the buffer and adds ``scale * dy`` into G's prefix. BN's backward through the
    batch statistics is linear in dy with per-channel coefficients,

        dx = scale * dy + coef_x * (x - mean) + coef_c,
        coef_x = -scale * invstd * sum(dy * xhat) / M,   coef_c = -scale * sum(dy) / M,

    so the coefficients of every BN that read a channel are summed and applied to G once, when the
    walk reaches the layer that wrote the channel (all of its readers are done by then).

Everything here is plain data: a :class:`StageSpec` of numbers and tensors (no modules), so the
whole stage can run as one registered custom op (``block.py``). Tensor arithmetic goes through the
backend's op interface (``ops/interface.py``); this module only does per-channel bookkeeping.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .ops.interface import Backend, memory_format, stats_dtype
from .sync import BatchSync

PARAMS_PER_LAYER = 6  # norm1.weight, norm1.bias, conv1.weight, norm2.weight, norm2.bias, conv2.weight
# then the transition's norm.weight, norm.bias, conv.weight


class NormSpec(NamedTuple):
    """One BatchNorm2d as the algorithm needs it."""

    eps: float
    momentum: Optional[float]  # None: cumulative average
    batch_stats: bool  # normalize with batch statistics (training, or no running stats kept)
    update: bool  # update running stats (training with track_running_stats)
    running: Optional[tuple[Tensor, Tensor, Optional[Tensor]]]  # running mean, var, num_batches_tracked


class StageSpec(NamedTuple):
    growth_rate: int
    num_layers: int
    has_transition: bool
    norms: list[NormSpec]  # layer i: norms[2i] (norm1) and norms[2i+1] (norm2); then the transition's
    drop_rates: list[float]  # per layer, 0 where dropout is off (eval mode)
    memory_efficient: bool  # False keeps each bottleneck instead of recomputing it in backward
    sync: Optional[BatchSync]  # synchronized statistics across processes, or None

    def reads_batch_stats(self) -> bool:
        """Whether any BN reading the buffer (every norm1, the transition's) uses batch statistics."""
        readers = self.norms[0::2][:self.num_layers] + (self.norms[-1:] if self.has_transition else [])
        return any(n.batch_stats for n in readers)


class BNCoefs(NamedTuple):
    """One BN as the ops see it: relu(x * scale + shift); backward reduces around ``center``."""

    scale: Tensor
    shift: Tensor
    center: Tensor
    invstd: Tensor


class Saved(NamedTuple):
    """What backward needs from forward."""

    buf: Tensor
    mean: Tensor
    coefs: list[BNCoefs]  # per norm, in StageSpec.norms order
    masks: list[Optional[Tensor]]  # per layer: dropout keep-mask
    bottlenecks: list[Optional[Tensor]]  # per layer: kept conv1 output (memory_efficient=False)


def _new_running_stats(norm: NormSpec, mean: Tensor, var: Tensor, count: int) -> list[Tensor]:
    """torch.nn.BatchNorm's update, as new tensors: unbiased variance, momentum or cumulative average."""
    rm, rv, nbt = norm.running
    new_nbt = None if nbt is None else nbt + 1
    if norm.momentum is not None:
        factor = norm.momentum
    else:  # torch's cumulative average; without num_batches_tracked torch leaves the stats as they are
        factor = 0.0 if new_nbt is None else 1.0 / float(new_nbt)
    new_rm = rm * (1.0 - factor) + mean.to(rm.dtype) * factor
    new_rv = rv * (1.0 - factor) + (var * (count / (count - 1))).to(rv.dtype) * factor
    return [new_rm, new_rv] + ([] if new_nbt is None else [new_nbt])


def _normalize(norm: NormSpec, weight: Optional[Tensor], bias: Optional[Tensor], mean: Optional[Tensor],
               var: Optional[Tensor], count: int, sdt: torch.dtype, new_running: list[Tensor]) -> BNCoefs:
    """The BN's coefficients over its channels; appends its updated running stats to ``new_running``."""
    if norm.batch_stats:
        if count <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {count} (batch x height x width)"
            )
        if norm.update:
            new_running += _new_running_stats(norm, mean, var, count)
    else:
        mean, var = norm.running[0].to(sdt), norm.running[1].to(sdt)
    invstd = torch.rsqrt(var + norm.eps)
    scale = invstd if weight is None else weight.to(sdt) * invstd
    shift = -mean * scale if bias is None else bias.to(sdt) - mean * scale
    return BNCoefs(scale, shift, mean, invstd)


def _stats(mean_var: tuple[Tensor, Tensor], sync: Optional[BatchSync]) -> tuple[Tensor, Tensor]:
    return mean_var if sync is None else sync.stats(*mean_var)


def forward(backend: Backend, x: Tensor, spec: StageSpec, params: Sequence[Optional[Tensor]],
            for_backward: bool) -> tuple[Tensor, Optional[Saved], list[Tensor]]:
    """Returns (output, what backward needs or None, updated running stats in StageSpec.norms order).

    ``params`` are detached and already in the activations' dtype for convs.
    """
    n, c0, h, w = x.shape
    k, num_layers = spec.growth_rate, spec.num_layers
    channels = c0 + num_layers * k
    sdt = stats_dtype(x.dtype)
    need_stats = spec.reads_batch_stats()
    sync = spec.sync
    count = sync.total if sync else n * h * w  # values per channel that BN's statistics cover
    new_running: list[Tensor] = []

    if num_layers == 0:
        buf = x
    else:
        buf = torch.empty((n, channels, h, w), dtype=x.dtype, device=x.device, memory_format=memory_format(x))
        buf[:, :c0].copy_(x)
    mean = torch.zeros(channels, dtype=sdt, device=x.device)
    var = torch.ones(channels, dtype=sdt, device=x.device)
    if need_stats:
        mean[:c0], var[:c0] = _stats(backend.channel_stats(x), sync)

    coefs, masks, bottlenecks = [], [], []
    for i in range(num_layers):
        c = c0 + i * k
        w1, b1, conv1, w2, b2, conv2 = params[i * PARAMS_PER_LAYER:(i + 1) * PARAMS_PER_LAYER]
        norm1, norm2 = spec.norms[2 * i], spec.norms[2 * i + 1]
        bn1 = _normalize(norm1, w1, b1, mean[:c], var[:c], count, sdt, new_running)
        z, z_mean, z_var = backend.bn_relu_conv1x1(buf[:, :c], bn1.scale, bn1.shift, conv1, norm2.batch_stats)
        if norm2.batch_stats:
            z_mean, z_var = _stats((z_mean, z_var), sync)
        bn2 = _normalize(norm2, w2, b2, z_mean, z_var, count, sdt, new_running)
        noise = None
        p = spec.drop_rates[i]
        if p > 0:
            # F.dropout's CPU formula and RNG use, so a seeded run matches torchvision's masks.
            noise = torch.empty((n, k, h, w), dtype=x.dtype, device=x.device).bernoulli_(1 - p)
            if p < 1:
                noise.div_(1 - p)
            else:
                noise.zero_()
        f_mean, f_var = backend.bn_relu_conv3x3(z, bn2.scale, bn2.shift, conv2, buf[:, c:c + k], noise, need_stats)
        if need_stats:
            mean[c:c + k], var[c:c + k] = _stats((f_mean, f_var), sync)
        if for_backward:
            coefs += [bn1, bn2]
            masks.append(noise.ne(0) if noise is not None else None)
            bottlenecks.append(None if spec.memory_efficient else z)
        del z, noise

    out = buf
    if spec.has_transition:
        wt, bt, convt = params[num_layers * PARAMS_PER_LAYER:]
        bnt = _normalize(spec.norms[-1], wt, bt, mean, var, count, sdt, new_running)
        out = backend.bn_relu_pool_conv1x1(buf, bnt.scale, bnt.shift, convt)
        coefs.append(bnt)
    saved = Saved(buf, mean, coefs, masks, bottlenecks) if for_backward else None
    return out, saved, new_running


def _param_grads(bn: BNCoefs, sum_dy: Tensor, sum_dy_xc: Tensor, weight, bias):
    grad_w = (bn.invstd * sum_dy_xc).to(weight.dtype) if weight is not None else None
    grad_b = sum_dy.to(bias.dtype) if bias is not None else None
    return grad_w, grad_b


def _batch_coefs(bn: BNCoefs, sum_dy: Tensor, sum_dy_xc: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """coef_x, coef_c of the backward through the batch statistics (see the module docstring)."""
    coef_x = -bn.scale * bn.invstd * bn.invstd * sum_dy_xc / count
    coef_c = -bn.scale * sum_dy / count
    return coef_x, coef_c


def backward(backend: Backend, spec: StageSpec, saved: Saved, grad_out: Tensor, in_channels: int,
             x_format: torch.memory_format, params: Sequence[Optional[Tensor]], needs: Sequence[bool],
             x_needs: bool):
    """Returns (grad of the stage input or None, grads of ``params`` with None where not needed).

    ``params`` as in forward (conv weights in the activations' dtype); weight grads come back in
    the activations' dtype and BN grads in the statistics dtype: the caller casts them.
    """
    buf, mean = saved.buf, saved.mean
    num_layers, k, c0 = spec.num_layers, spec.growth_rate, in_channels
    n, channels, h, w = buf.shape
    sync = spec.sync
    count = sync.total if sync else n * h * w
    grads: list[Optional[Tensor]] = [None] * len(params)
    reads_batch_stats = spec.reads_batch_stats()
    coef_x = torch.zeros_like(mean)
    coef_c = torch.zeros_like(mean)

    if spec.has_transition:
        bnt, base = saved.coefs[-1], num_layers * PARAMS_PER_LAYER
        r = backend.bn_relu_pool_conv1x1_backward(
            grad_out, buf, bnt.scale, bnt.shift, params[base + 2], bnt.center, None, needs[base + 2])
        grad_buf = r.grad_x
        grads[base], grads[base + 1] = _param_grads(bnt, r.sum_dy, r.sum_dy_xc, params[base], params[base + 1])
        grads[base + 2] = r.grad_weight
        if spec.norms[-1].batch_stats:
            cx, cc = _batch_coefs(bnt, r.sum_dy, r.sum_dy_xc, count)
            coef_x += cx
            coef_c += cc
        del r
    else:
        grad_buf = torch.empty_like(buf)
        grad_buf.copy_(grad_out)

    for i in reversed(range(num_layers)):
        c, base = c0 + i * k, i * PARAMS_PER_LAYER
        new = slice(c, c + k)
        bn1, bn2 = saved.coefs[2 * i], saved.coefs[2 * i + 1]
        w1, b1, conv1, w2, b2, conv2 = params[base:base + PARAMS_PER_LAYER]
        if reads_batch_stats:
            # Every reader of channels [c, c+k) is done: apply their batch-statistics terms once.
            if sync:
                sync.sum_(coef_x[new], coef_c[new])
            backend.bn_grad_finalize(grad_buf[:, new], buf[:, new], mean[new], coef_x[new], coef_c[new])
        grad_new = grad_buf[:, new]
        if saved.masks[i] is not None:
            p = spec.drop_rates[i]
            grad_new = grad_new * saved.masks[i] * (1.0 / (1.0 - p) if p < 1 else 0.0)
        z = saved.bottlenecks[i]
        if z is None:
            z = backend.bn_relu_conv1x1(buf[:, :c], bn1.scale, bn1.shift, conv1, False)[0]
        r2 = backend.bn_relu_conv3x3_backward(grad_new, z, bn2.scale, bn2.shift, conv2, bn2.center, None,
                                              needs[base + 5])
        del grad_new
        grads[base + 3], grads[base + 4] = _param_grads(bn2, r2.sum_dy, r2.sum_dy_xc, w2, b2)
        grads[base + 5] = r2.grad_weight
        grad_z = r2.grad_x
        if spec.norms[2 * i + 1].batch_stats:
            sums = (r2.sum_dy.clone(), r2.sum_dy_xc.clone())
            if sync:
                sync.sum_(*sums)  # parameter grads above stay local, as in torch's SyncBatchNorm
            backend.bn_grad_finalize(grad_z, z, bn2.center, *_batch_coefs(bn2, *sums, count))
        del z, r2
        r1 = backend.bn_relu_conv1x1_backward(grad_z, buf[:, :c], bn1.scale, bn1.shift, conv1, bn1.center,
                                              grad_buf[:, :c], needs[base + 2])
        del grad_z
        grads[base], grads[base + 1] = _param_grads(bn1, r1.sum_dy, r1.sum_dy_xc, w1, b1)
        grads[base + 2] = r1.grad_weight
        if spec.norms[2 * i].batch_stats:
            cx, cc = _batch_coefs(bn1, r1.sum_dy, r1.sum_dy_xc, count)
            coef_x[:c] += cx
            coef_c[:c] += cc
        del r1

    grads = [g if need else None for g, need in zip(grads, needs)]
    if not x_needs:
        return None, grads
    if reads_batch_stats:
        if sync:
            sync.sum_(coef_x[:c0], coef_c[:c0])
        backend.bn_grad_finalize(grad_buf[:, :c0], buf[:, :c0], mean[:c0], coef_x[:c0], coef_c[:c0])
    if num_layers == 0:
        return grad_buf.contiguous(memory_format=x_format), grads
    return grad_buf[:, :c0].clone(memory_format=x_format), grads
