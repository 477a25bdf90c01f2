"""The dense-block algorithm: a whole dense block (and the transition after it) as one node.

Forward
    One feature buffer N x (C0 + L*k) x H x W per block. The block input is copied into its first C0
    channels and every layer writes its k new channels into its own slice: no torch.cat. The batch
    mean, variance and inverse standard deviation of a buffer channel are computed once, when the
    channel is written, and reused by every later BN that reads it (each with its own weight, bias
    and running stats; one with another eps takes its own invstd). Kept for backward: the buffer, the
    stage's packed per-channel numbers (below), dropout's masks, and each bottleneck only with
    memory_efficient=False.

Backward
    One gradient buffer G of the block's size. Layers are walked in reverse; each recomputes its
    bottleneck from the buffer and adds ``scale * dy`` into G's prefix. BN's backward through the
    batch statistics is linear in dy with per-channel coefficients,

        dx = scale * dy + coef_x * (x - mean) + coef_c,
        coef_x = -scale * invstd**2 * sum(dy * (x - mean)) / M,   coef_c = -scale * sum(dy) / M,

    so the coefficients of every BN that read a channel are summed and applied to G once, when the
    walk reaches the layer that wrote the channel (all of its readers are done by then). The factors
    ``-scale * invstd**2 / M`` and ``-scale / M`` of every BN come from a few ops per stage (``_grad_factors``).

Packed numbers
    Everything per channel of a stage lives in one flat tensor (:class:`Layout` says where): the batch
    mean, the unbiased batch variance (what running stats take) and invstd of every buffer channel and
    every bottleneck channel, then each BN's scale and shift, and a center/invstd of its own for a BN
    that normalizes with running stats (or with an eps other than the buffer's). The op returns it
    whole: backward takes views of it and the caller updates every running stat of the stage from it.

Everything here is plain data: a :class:`StageSpec` of numbers (no modules), decoded once from the
custom op's argument lists (``decode``), so the whole stage can run as one registered op
(``stage.py``). Tensor arithmetic goes through the backend's op interface (``ops/interface.py``)
and BN's own formulas (invstd, running stats) through ``bn_math.py``; this module only does
per-channel bookkeeping.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

# update_running_stats lived here before bn_math: re-exported for callers that import it from here.
from .bn_math import rsqrt_eps, update_running_stats as update_running_stats
from .ops.interface import Backend, CoefsFrom, CoefSums, StatsOut, memory_format, stats_dtype
from .stage_sync import BatchSync

PARAMS_PER_LAYER = 6  # norm1.weight, norm1.bias, conv1.weight, norm2.weight, norm2.bias, conv2.weight
# then the transition's norm.weight, norm.bias, conv.weight
_HEADER = 6  # ints: in_channels, growth_rate, num_layers, has_transition, memory_efficient, sync group or -1
_BATCH_STATS, _HAS_WEIGHT, _HAS_BIAS = 1, 2, 4  # per-norm flag bits


class Slots(NamedTuple):
    """Where one BN's numbers sit in the packed tensor (offsets of ``width`` entries each)."""

    width: int
    stats: int  # its batch mean; the unbiased variance and invstd rows follow at the same place
    scale: int
    shift: int
    center: int  # = stats when it normalizes with batch statistics, else its own copy of the running mean
    invstd: int  # the shared one of its channels, or its own
    own_invstd: bool  # computes invstd itself (a bottleneck's BN, another eps, running stats)


class Layout(NamedTuple):
    size: int  # entries of the packed tensor
    stats_width: int  # C + sum of bottleneck widths: one row each of mean, unbiased var, invstd
    channel_eps: Optional[float]  # the eps of the buffer channels' shared invstd (None: none computed)
    norms: tuple[Slots, ...]


class StageSpec(NamedTuple):
    in_channels: int
    growth_rate: int
    num_layers: int
    has_transition: bool
    memory_efficient: bool  # False keeps each bottleneck instead of recomputing it in backward
    group_index: int  # process group of synchronized statistics, or -1
    bottlenecks: tuple[int, ...]  # per layer: conv1's output channels
    eps: tuple[float, ...]  # per norm: layer i has norms 2i (norm1) and 2i+1 (norm2), then the transition's
    batch_stats: tuple[bool, ...]  # per norm: normalizes with batch statistics (training, or no running stats)
    has_weight: tuple[bool, ...]
    has_bias: tuple[bool, ...]
    drop_rates: tuple[float, ...]  # per layer, 0 where dropout is off (eval mode)
    layout: Layout

    @property
    def channels(self) -> int:
        return self.in_channels + self.num_layers * self.growth_rate

    def reads_batch_stats(self) -> bool:
        """Whether any BN reading the buffer (every norm1, the transition's) uses batch statistics."""
        readers = self.batch_stats[0::2][:self.num_layers] + (self.batch_stats[-1:] if self.has_transition else ())
        return any(readers)

    def batch_norms(self) -> list[int]:
        return [j for j, b in enumerate(self.batch_stats) if b]

    def width(self, j: int) -> int:
        """Channels of norm ``j``."""
        if j >= 2 * self.num_layers:
            return self.channels
        return self.in_channels + (j // 2) * self.growth_rate if j % 2 == 0 else self.bottlenecks[j // 2]


def encode(in_channels: int, growth_rate: int, num_layers: int, has_transition: bool, memory_efficient: bool,
           group_index: int, bottlenecks: Sequence[int], eps: Sequence[float], batch_stats: Sequence[bool],
           has_weight: Sequence[bool], has_bias: Sequence[bool],
           drop_rates: Sequence[float]) -> tuple[list[int], list[float]]:
    """The op's (ints, floats) arguments: the one encoding of a stage, read back by :func:`decode`."""
    flags = [_BATCH_STATS * b + _HAS_WEIGHT * w + _HAS_BIAS * c for b, w, c in zip(batch_stats, has_weight, has_bias)]
    ints = [in_channels, growth_rate, num_layers, int(has_transition), int(memory_efficient), group_index]
    return ints + list(bottlenecks) + flags, list(eps) + list(drop_rates)


def decode(ints: Sequence[int], floats: Sequence[float]) -> StageSpec:
    """The StageSpec that :func:`encode` wrote (cached: a stage decodes the same way every step)."""
    if torch.compiler.is_compiling():  # traced once into the graph; dynamo warns about caches
        return _decode_uncached(tuple(ints), tuple(floats))
    return _decode(tuple(ints), tuple(floats))


def _decode_uncached(ints: tuple[int, ...], floats: tuple[float, ...]) -> StageSpec:
    c0, k, num_layers, has_transition, memory_efficient, group_index = ints[:_HEADER]
    bottlenecks = ints[_HEADER:_HEADER + num_layers]
    flags = ints[_HEADER + num_layers:]
    num_norms = len(flags)
    if num_norms != 2 * num_layers + has_transition or len(floats) != num_norms + num_layers:
        raise ValueError(f"malformed dense_stage arguments: {len(flags)} norms, {len(floats)} floats for "
                         f"{num_layers} layers{' and a transition' if has_transition else ''}")
    eps = floats[:num_norms]
    batch_stats = tuple(bool(f & _BATCH_STATS) for f in flags)
    spec = StageSpec(c0, k, num_layers, bool(has_transition), bool(memory_efficient), group_index, bottlenecks,
                     eps, batch_stats, tuple(bool(f & _HAS_WEIGHT) for f in flags),
                     tuple(bool(f & _HAS_BIAS) for f in flags), floats[num_norms:], None)
    return spec._replace(layout=_layout(spec))


_decode = functools.lru_cache(maxsize=256)(_decode_uncached)


def _layout(spec: StageSpec) -> Layout:
    channels = spec.channels
    stats_width = channels + sum(spec.bottlenecks)
    # Norms 2i (a layer's norm1) and 2L (the transition's) read the buffer; norms 2i+1 a bottleneck.
    readers = [j for j in range(0, len(spec.eps), 2) if spec.batch_stats[j]]
    channel_eps = spec.eps[readers[0]] if readers else None
    size = 3 * stats_width
    norms, bottleneck_offset = [], channels
    for j, eps in enumerate(spec.eps):
        width = spec.width(j)
        reads_buffer = j % 2 == 0
        stats = 0 if reads_buffer else bottleneck_offset
        if not reads_buffer:
            bottleneck_offset += width
        scale, shift, size = size, size + width, size + 2 * width
        center, invstd = stats, 2 * stats_width + stats
        own_invstd = not spec.batch_stats[j] or not reads_buffer or eps != channel_eps
        if not spec.batch_stats[j]:
            center, size = size, size + width
        if own_invstd and (reads_buffer or not spec.batch_stats[j]):
            invstd, size = size, size + width
        norms.append(Slots(width, stats, scale, shift, center, invstd, own_invstd))
    return Layout(size, stats_width, channel_eps, tuple(norms))


class BNCoefs(NamedTuple):
    """One BN as the ops see it: relu(x * scale + shift); backward reduces around ``center``."""

    scale: Tensor
    shift: Tensor
    center: Tensor
    invstd: Tensor


def coefs_of(packed: Tensor, slots: Slots) -> BNCoefs:
    """Views of one BN's numbers in the packed tensor."""
    w = slots.width
    return BNCoefs(packed[slots.scale:slots.scale + w], packed[slots.shift:slots.shift + w],
                   packed[slots.center:slots.center + w], packed[slots.invstd:slots.invstd + w])


def batch_stats_of(packed: Tensor, layout: Layout, j: int) -> tuple[Tensor, Tensor]:
    """Norm ``j``'s batch mean and unbiased batch variance: views of the packed tensor."""
    s = layout.norms[j]
    return packed[s.stats:s.stats + s.width], packed[layout.stats_width + s.stats:][:s.width]


class Saved(NamedTuple):
    """What backward needs from forward."""

    buf: Tensor
    packed: Tensor  # the stage's packed numbers (see the module docstring)
    masks: list[Tensor]  # dropout keep-masks of the layers with dropout on
    bottlenecks: list[Tensor]  # kept conv1 outputs (memory_efficient=False), else empty


Count = Union[int, Tensor]  # values per channel: a Python int, or a tensor when summed over processes


def _normalize(backend: Backend, packed: Tensor, slots: Slots, eps: float, weight: Optional[Tensor],
               bias: Optional[Tensor], mean: Tensor, var: Optional[Tensor],
               running: Optional[tuple[Tensor, Tensor]]) -> BNCoefs:
    """Writes one BN's scale and shift (and its own center and invstd) into ``packed``.

    ``mean``/``var``: its batch statistics (``var`` only where it computes its own invstd), unused
    with ``running`` (the running mean and variance it normalizes with in eval mode).
    """
    bn = coefs_of(packed, slots)
    if running is not None:
        bn.center.copy_(running[0])
        mean, var = bn.center, running[1]
    if slots.own_invstd:
        rsqrt_eps(var, eps, bn.invstd)
    # scale and shift are adjacent in the layout: one (2, width) block
    backend.bn_coefficients(mean, bn.invstd, weight, bias,
                            packed[slots.scale:slots.scale + 2 * slots.width].view(2, -1))
    return bn


def _reader_coefficients(backend: Backend, packed: Tensor, slots: Slots, eps: float, weight: Optional[Tensor],
                         bias: Optional[Tensor], mean: Tensor, var: Tensor, to_biased: float,
                         running: Optional[tuple[Tensor, Tensor]]) -> tuple[BNCoefs, Optional[CoefsFrom]]:
    """A BN that reads the buffer, as :func:`_normalize`; when it normalizes with the buffer
    channels' shared batch statistics, its scale and shift are left to the op that applies them
    (the returned CoefsFrom), which computes them in its own launch. ``var`` times ``to_biased`` is
    the biased variance (the rows hold the unbiased one once the ops have written it)."""
    if running is None and not slots.own_invstd:
        bn = coefs_of(packed, slots)
        return bn, CoefsFrom(mean, bn.invstd, weight, bias,
                             packed[slots.scale:slots.scale + 2 * slots.width].view(2, -1))
    if running is None and to_biased != 1.0:  # a BN with an eps of its own
        var = var * to_biased
    return _normalize(backend, packed, slots, eps, weight, bias, mean, var, running), None


def _stats(mean_var: tuple[Tensor, Tensor], sync: Optional[BatchSync]) -> tuple[Tensor, Tensor]:
    return mean_var if sync is None else sync.stats(*mean_var)


def _check_count(count: int, sync: Optional[BatchSync]) -> None:
    # With synchronized statistics only a local batch of one value needs the global count (a sync).
    if count <= 1 and (sync is None or sync.total_count() <= 1):
        raise ValueError(f"Expected more than 1 value per channel when training, got {count} (batch x height x width)")


def forward(backend: Backend, x: Tensor, spec: StageSpec, params: Sequence[Optional[Tensor]],
            running: Sequence[Tensor], sync: Optional[BatchSync],
            for_backward: bool) -> tuple[Tensor, Optional[Saved], Tensor]:
    """Returns (output, what backward needs or None, the packed numbers).

    ``params`` are detached, conv weights in the activations' dtype; ``running`` holds the running
    (mean, var) of each BN that normalizes with them, in norm order.
    """
    n, c0, h, w = x.shape
    k, num_layers, lay = spec.growth_rate, spec.num_layers, spec.layout
    sdt = stats_dtype(x.dtype)
    count = n * h * w  # values per channel that this process's statistics cover
    any_batch = any(spec.batch_stats)
    if any_batch:
        _check_count(count, sync)
    need_stats = spec.reads_batch_stats()
    every_stat = need_stats and all(spec.batch_stats[1:2 * num_layers:2])
    # Entries no BN writes stay zero (an eval-mode BN among training ones): nothing reads them.
    packed = (torch.empty if every_stat or not any_batch else torch.zeros)(lay.size, dtype=sdt, device=x.device)
    width = lay.stats_width
    mean, var, invstd = packed[:width], packed[width:2 * width], packed[2 * width:3 * width]
    rows = packed[:3 * width].view(3, width)  # the mean, var and invstd rows, one column per channel
    eval_running = iter(zip(running[0::2], running[1::2]))

    def next_running(j):
        return None if spec.batch_stats[j] else next(eval_running)

    def write_channels(lo: int, stats: tuple[Tensor, Tensor]) -> None:
        m, v = _stats(stats, sync)
        hi = lo + m.shape[0]
        torch._foreach_copy_([mean[lo:hi], var[lo:hi]], [m, v])
        rsqrt_eps(v, lay.channel_eps, invstd[lo:hi])

    if num_layers == 0:
        buf = x
    else:
        buf = torch.empty((n, spec.channels, h, w), dtype=x.dtype, device=x.device, memory_format=memory_format(x))

    def stats_into(j: Optional[int], lo: int, count: int, weight=None, bias=None) -> Optional[StatsOut]:
        """Where an op writes the statistics of channels [lo, lo + count) of the rows (and, for norm j,
        that BN's coefficients, from ``weight`` and ``bias``): none with synchronized statistics,
        which are all-reduced first."""
        if sync is not None:
            return None
        if j is None:
            return StatsOut(rows[:, lo:lo + count], lay.channel_eps)
        s = lay.norms[j]  # a bottleneck's BN: its invstd is the rows' third, its shift follows its scale
        return StatsOut(rows[:, lo:lo + count], spec.eps[j], packed[s.scale:s.scale + 2 * count].view(2, count),
                        weight, bias)

    # The input's channels enter the buffer as their statistics are taken (one read of x).
    copy_to = buf[:, :c0] if num_layers > 0 else None
    if need_stats:
        into0 = stats_into(None, 0, c0)
        x_stats = backend.channel_stats(x, into0, copy_to)
        if into0 is None:
            write_channels(0, x_stats)
    elif copy_to is not None:
        copy_to.copy_(x)

    # The ops write the unbiased variance into the rows (StatsOut); with synchronized statistics
    # the rows hold the biased one until the end of the forward.
    to_biased = (count - 1) / count if sync is None and count > 1 else 1.0  # (count <= 1: no batch statistics)
    masks, bottlenecks, z_slots, z_stats = [], [], [], []
    for i in range(num_layers):
        c = c0 + i * k
        w1, b1, conv1, w2, b2, conv2 = params[i * PARAMS_PER_LAYER:(i + 1) * PARAMS_PER_LAYER]
        j1, j2 = 2 * i, 2 * i + 1
        bn1, from1 = _reader_coefficients(backend, packed, lay.norms[j1], spec.eps[j1], w1, b1, mean[:c], var[:c],
                                          to_biased,
                                          next_running(j1))
        batch2, slots2 = spec.batch_stats[j2], lay.norms[j2]
        into2 = stats_into(j2, slots2.stats, slots2.width, w2, b2) if batch2 else None
        z, z_mean, z_var = backend.bn_relu_conv1x1(buf[:, :c], bn1.scale, bn1.shift, conv1, batch2, into2, from1)
        if into2 is not None:
            bn2 = coefs_of(packed, slots2)  # written by the op
        else:
            if batch2:
                z_mean, z_var = _stats((z_mean, z_var), sync)
                z_slots += [mean[slots2.stats:slots2.stats + slots2.width],
                            var[slots2.stats:slots2.stats + slots2.width]]
                z_stats += [z_mean, z_var]
            bn2 = _normalize(backend, packed, slots2, spec.eps[j2], w2, b2, z_mean, z_var, next_running(j2))
        noise = None
        p = spec.drop_rates[i]
        if p > 0:
            # F.dropout's CPU formula and RNG use, so a seeded run matches torchvision's masks.
            noise = torch.empty((n, k, h, w), dtype=x.dtype, device=x.device).bernoulli_(1 - p)
            if p < 1:
                noise.div_(1 - p)
            else:
                noise.zero_()
        into3 = stats_into(None, c, k) if need_stats else None
        new_stats = backend.bn_relu_conv3x3(z, bn2.scale, bn2.shift, conv2, buf[:, c:c + k], noise, need_stats, into3)
        if need_stats and into3 is None:
            write_channels(c, new_stats)
        if for_backward:
            if noise is not None:
                masks.append(noise.ne(0))
            if not spec.memory_efficient:
                bottlenecks.append(z)
        del z, noise

    out = buf
    if spec.has_transition:
        wt, bt, convt = params[num_layers * PARAMS_PER_LAYER:]
        j = 2 * num_layers
        bnt, fromt = _reader_coefficients(backend, packed, lay.norms[j], spec.eps[j], wt, bt, mean[:spec.channels],
                                          var[:spec.channels], to_biased, next_running(j))
        out = backend.bn_relu_pool_conv1x1(buf, bnt.scale, bnt.shift, convt, fromt)
    if z_slots:
        torch._foreach_copy_(z_slots, z_stats)
    if any_batch and sync is not None:
        # Running stats take the unbiased variance; nothing else reads this row from here on.
        var.mul_(sync.total / (sync.total - 1))
    saved = Saved(buf, packed, masks, bottlenecks) if for_backward else None
    return out, saved, packed


def _grad_factors(spec: StageSpec, packed: Tensor, count: Count) -> tuple[dict, dict]:
    """Per batch-statistics BN j: kx[j] = -scale * invstd**2 / M and kc[j] = -scale / M (see the
    docstring). kc is every packed number times -1/M and invstd**2 every packed number squared (one
    op each, over a few thousand numbers, where per-BN lists cost a launch per 30 BNs): each BN's
    factors are their views at its scale's and its invstd's slots, and kx one product per BN."""
    batch = spec.batch_norms()
    if not batch:
        return {}, {}
    kc_all = packed * (-1.0 / count) if isinstance(count, int) else packed / count.neg()
    squares = packed * packed
    slots = [spec.layout.norms[j] for j in batch]
    kc = [kc_all[s.scale:s.scale + s.width] for s in slots]
    kx = torch._foreach_mul(kc, [squares[s.invstd:s.invstd + s.width] for s in slots])
    return dict(zip(batch, kx)), dict(zip(batch, kc))


def backward(backend: Backend, spec: StageSpec, saved: Saved, grad_out: Tensor, x_format: torch.memory_format,
             params: Sequence[Optional[Tensor]], needs: Sequence[bool], x_needs: bool,
             sync: Optional[BatchSync]) -> tuple[Optional[Tensor], list[Optional[Tensor]]]:
    """Returns (grad of the stage input or None, grads of ``params`` with None where not needed).

    ``params`` as in forward (conv weights in the activations' dtype); conv weight grads (contiguous)
    and BN grads come back in the statistics dtype: the caller casts them to the parameters' dtype.
    """
    buf, packed, lay = saved.buf, saved.packed, spec.layout
    num_layers, k, c0 = spec.num_layers, spec.growth_rate, spec.in_channels
    n, channels, h, w = buf.shape
    count = sync.total.to(packed.dtype) if sync is not None else n * h * w
    grads: list[Optional[Tensor]] = [None] * len(params)
    coefs = [coefs_of(packed, s) for s in lay.norms]
    kx, kc = _grad_factors(spec, packed, count)
    sums: dict[int, tuple[Tensor, Tensor]] = {}  # per norm: its local sum(dy), sum(dy * (x - center))
    mean = packed[:channels]
    reads_batch_stats = spec.reads_batch_stats()
    found_masks = iter(saved.masks)
    masks = [next(found_masks) if p > 0 else None for p in spec.drop_rates]  # per layer
    acc = None  # coef_x, coef_c of every buffer channel, summed over the BNs that read it
    if reads_batch_stats:
        acc = torch.zeros((2, channels), dtype=packed.dtype, device=packed.device)

    if spec.has_transition:
        j, base = 2 * num_layers, num_layers * PARAMS_PER_LAYER
        bnt = coefs[j]
        coef_sums = CoefSums(acc[0], acc[1], kx[j], kc[j]) if spec.batch_stats[j] else None
        grad_buf = torch.empty_like(buf)
        r = backend.bn_relu_pool_conv1x1_backward(
            grad_out, buf, bnt.scale, bnt.shift, params[base + 2], bnt.center, grad_buf, False, needs[base + 2],
            coef_sums)
        grads[base + 2], sums[j] = r.grad_weight, (r.sum_dy, r.sum_dy_xc)
        del r
    else:
        grad_buf = torch.empty_like(buf)
        grad_buf.copy_(grad_out)

    def finalize(channel_slice: slice) -> None:
        # Every reader of these channels is done: apply their batch-statistics terms once.
        cx, cc = acc[0, channel_slice], acc[1, channel_slice]
        if sync is not None:
            cx, cc = sync.sum(cx, cc)
        backend.bn_grad_finalize(grad_buf[:, channel_slice], buf[:, channel_slice], mean[channel_slice], cx, cc)

    for i in reversed(range(num_layers)):
        c, base = c0 + i * k, i * PARAMS_PER_LAYER
        j1, j2 = 2 * i, 2 * i + 1
        bn1, bn2 = coefs[j1], coefs[j2]
        conv1, conv2 = params[base + 2], params[base + 5]
        if reads_batch_stats:
            finalize(slice(c, c + k))
        grad_new = grad_buf[:, c:c + k]
        p = spec.drop_rates[i]
        if p > 0:
            grad_new = grad_new * masks[i] * (1.0 / (1.0 - p) if p < 1 else 0.0)
        z = saved.bottlenecks[i] if not spec.memory_efficient else None
        if z is None:
            z = backend.bn_relu_conv1x1(buf[:, :c], bn1.scale, bn1.shift, conv1, False)[0]
        grad_z = torch.empty_like(z)
        r2 = backend.bn_relu_conv3x3_backward(grad_new, z, bn2.scale, bn2.shift, conv2, bn2.center, grad_z, False,
                                              needs[base + 5])
        del grad_new
        grads[base + 5], sums[j2] = r2.grad_weight, (r2.sum_dy, r2.sum_dy_xc)
        if spec.batch_stats[j2]:
            sum_dy, sum_dy_xc = sums[j2] if sync is None else sync.sum(*sums[j2])  # parameter grads stay local
            backend.bn_grad_finalize(grad_z, z, bn2.center, sum_dy_xc, sum_dy, (kx[j2], kc[j2]))
        del z, r2
        coef_sums = CoefSums(acc[0, :c], acc[1, :c], kx[j1], kc[j1]) if spec.batch_stats[j1] else None
        r1 = backend.bn_relu_conv1x1_backward(grad_z, buf[:, :c], bn1.scale, bn1.shift, conv1, bn1.center,
                                              grad_buf[:, :c], True, needs[base + 2], coef_sums)
        del grad_z
        grads[base + 2], sums[j1] = r1.grad_weight, (r1.sum_dy, r1.sum_dy_xc)
        del r1

    _bn_param_grads(spec, coefs, sums, needs, grads)
    grads = [g if need else None for g, need in zip(grads, needs)]
    if not x_needs:
        return None, grads
    if reads_batch_stats:
        finalize(slice(0, c0))
    if num_layers == 0:
        return grad_buf.contiguous(memory_format=x_format), grads
    return grad_buf[:, :c0].clone(memory_format=x_format), grads


def _bn_param_grads(spec: StageSpec, coefs: Sequence[BNCoefs], sums: dict, needs: Sequence[bool],
                    grads: list) -> None:
    """Every BN's weight grad (invstd * sum(dy * (x - center)), one op for the stage) and bias grad (sum(dy))."""
    weights = []
    for j in range(len(spec.eps)):
        base = PARAMS_PER_LAYER * (j // 2) + 3 * (j % 2) if j < 2 * spec.num_layers else PARAMS_PER_LAYER * (j // 2)
        if needs[base]:
            weights.append((base, j))
        if needs[base + 1]:
            grads[base + 1] = sums[j][0]
    if weights:
        found = torch._foreach_mul([coefs[j].invstd for _, j in weights], [sums[j][1] for _, j in weights])
        for (base, _), g in zip(weights, found):
            grads[base] = g
