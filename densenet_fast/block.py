"""A dense block (and the transition after it) as one registered custom op with its own backward.

``dense_stage(x, Stage(...))`` is what the models call. It turns the stage's modules into plain
numbers and tensors and calls ``densenet_fast::dense_stage``, a ``torch.library`` custom op whose
backward is another custom op, so the whole stage is one autograd node in eager mode and one
opaque node that ``torch.compile`` traces without graph breaks. The math is in
``block_algorithm.py``.

Running stats are updated exactly once per training forward: the op returns their new values and
the wrapper copies them into the module buffers (custom ops with autograd must be functional).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import block_algorithm as algo
from .ops import backend_name_for, backend_named
from .ops.interface import memory_format, stats_dtype
from .fusion import autocast_dtype
from .sync import BatchSync, active_group
from . import stage_autograd

# Process groups of synchronized stages, referred to by index in the op's arguments.
_PROCESS_GROUPS: list = []


def _uses_batch_stats(norm: nn.BatchNorm2d) -> bool:
    # torch.nn.BatchNorm's rule: batch statistics in training, or when no running stats are kept.
    return norm.training or norm.running_mean is None


class Stage:
    """What one node computes: a dense block's layers, then optionally a transition.

    ``memory_efficient=False`` keeps each layer's bottleneck (conv1 output) for backward instead
    of recomputing it: more memory, one conv1x1 less per layer in backward.
    """

    def __init__(self, layers: Sequence[nn.Module], transition: Optional[nn.Module], memory_efficient: bool = True,
                 name: str = "dense block", sync_batchnorm: bool = False, process_group=None):
        if not layers and transition is None:
            raise ValueError("a stage needs at least one dense layer or a transition")
        self.name = name  # for error messages, e.g. 'features.denseblock2 + features.transition2'
        self.layers = list(layers)
        self.transition = transition
        self.memory_efficient = memory_efficient
        # SyncBatchNorm semantics across process_group (None: the default group) when distributed.
        self.sync_batchnorm, self.process_group = sync_batchnorm, process_group
        self.in_channels = self.layers[0].norm1.num_features if self.layers else transition.norm.num_features
        self.growth_rate = self.layers[0].conv2.out_channels if self.layers else 0

    def norms(self) -> list[nn.BatchNorm2d]:
        norms = [n for layer in self.layers for n in (layer.norm1, layer.norm2)]
        return norms + ([self.transition.norm] if self.transition is not None else [])

    def params(self) -> list[Optional[Tensor]]:
        flat: list[Optional[Tensor]] = []
        for layer in self.layers:
            flat += [layer.norm1.weight, layer.norm1.bias, layer.conv1.weight,
                     layer.norm2.weight, layer.norm2.bias, layer.conv2.weight]
        if self.transition is not None:
            t = self.transition
            flat += [t.norm.weight, t.norm.bias, t.conv.weight]
        return flat


_OOM_MESSAGES = ("out of memory", "not enough memory", "can't allocate memory")


@contextlib.contextmanager
def _out_of_memory_names(name: str, x: Tensor, phase: str):
    """Re-raise running out of memory with the block, the batch and what to do about it."""
    try:
        yield
    except RuntimeError as err:  # torch.OutOfMemoryError is a RuntimeError; so is CPU allocation failure
        if not any(m in str(err) for m in _OOM_MESSAGES):
            raise
        n, _, h, w = x.shape
        raise type(err)(
            f"densenet_fast ran out of memory in the {phase} of {name} (batch {n}, {h}x{w}, {x.dtype}); "
            f"try a smaller batch or a smaller input. Original error: {err}"
        ) from None


# --- the custom ops -------------------------------------------------------------------------------
# Argument lists: ints = [growth_rate, num_layers, has_transition, memory_efficient, sync group or -1];
# per norm: eps, momentum (nan: None), batch_stats, update, has_running; running holds (mean, var,
# num_batches_tracked) for each norm with has_running; absent tensors are empty placeholders.


def _none_if_empty(t: Tensor) -> Optional[Tensor]:
    return None if t.numel() == 0 and t.dim() == 1 else t


def _spec(ints, eps, momentum, batch_stats, update, has_running, running, drop_rates, local_count, device):
    growth_rate, num_layers, has_transition, memory_efficient, group_index = ints
    norms, r = [], 0
    for i in range(len(eps)):
        run = None
        if has_running[i]:
            run = (running[r], running[r + 1], _none_if_empty(running[r + 2]))
            r += 3
        norms.append(algo.NormSpec(eps[i], None if math.isnan(momentum[i]) else momentum[i], batch_stats[i],
                                   update[i], run))
    sync = BatchSync(_PROCESS_GROUPS[group_index], local_count, device) if group_index >= 0 else None
    return algo.StageSpec(growth_rate, num_layers, bool(has_transition), norms, list(drop_rates),
                          bool(memory_efficient), sync)


def _op_params(params: list[Tensor], dtype: torch.dtype) -> list[Optional[Tensor]]:
    """Parameters as the algorithm takes them: conv weights (4-D) in the activations' dtype."""
    return [None if _none_if_empty(p) is None else (p.to(dtype) if p.dim() == 4 else p) for p in params]


@torch.library.custom_op("densenet_fast::dense_stage", mutates_args=())
def _dense_stage_op(
    x: Tensor, params: list[Tensor], running: list[Tensor], ints: list[int], eps: list[float],
    momentum: list[float], batch_stats: list[bool], update: list[bool], has_running: list[bool],
    drop_rates: list[float], for_backward: bool, backend: str, name: str,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """Returns (output, buffer or empty, channel means, BN coefficients, masks, bottlenecks, new running stats)."""
    n, _, h, w = x.shape
    spec = _spec(ints, eps, momentum, batch_stats, update, has_running, running, drop_rates, n * h * w, x.device)
    out, saved, new_running = algo.forward(backend_named(backend), x, spec, _op_params(params, x.dtype), for_backward)
    empty = x.new_empty(0)
    if saved is None:
        return out, empty, x.new_empty(0, dtype=stats_dtype(x.dtype)), [], [], [], new_running
    # Outputs may alias neither inputs nor each other: the small per-channel tensors are cloned.
    buf = saved.buf if (spec.num_layers > 0 and spec.has_transition) else empty
    coefs = [t.clone() for bn in saved.coefs for t in bn]
    masks = [empty.clone() if m is None else m for m in saved.masks]
    bottlenecks = [empty.clone() if z is None else z for z in saved.bottlenecks]
    return out, buf, saved.mean, coefs, masks, bottlenecks, new_running


@_dense_stage_op.register_fake
def _(x, params, running, ints, eps, momentum, batch_stats, update, has_running, drop_rates, for_backward, backend,
      name):
    growth_rate, num_layers, has_transition, memory_efficient, _ = ints
    n, c0, h, w = x.shape
    channels = c0 + num_layers * growth_rate
    fmt, sdt = memory_format(x), stats_dtype(x.dtype)
    buf_shape = (n, channels, h, w)
    if has_transition:
        out = x.new_empty((n, params[-1].shape[0], h // 2, w // 2)).contiguous(memory_format=fmt)
    else:
        out = x.new_empty(buf_shape).contiguous(memory_format=fmt)
    new_running, r = [], 0
    for i in range(len(eps)):
        if has_running[i]:
            if batch_stats[i] and update[i]:
                new_running += [torch.empty_like(t) for t in running[r:r + 3] if t.numel()]
            r += 3
    empty = x.new_empty(0)
    if not for_backward:
        return out, empty, x.new_empty(0, dtype=sdt), [], [], [], new_running
    buf = x.new_empty(buf_shape).contiguous(memory_format=fmt) if (num_layers and has_transition) else empty
    coefs = []
    for i in range(len(eps)):
        bottleneck = params[algo.PARAMS_PER_LAYER * (i // 2) + 2].shape[0] if i < 2 * num_layers else 0
        width = (c0 + (i // 2) * growth_rate if i % 2 == 0 else bottleneck) if i < 2 * num_layers else channels
        coefs += [x.new_empty(width, dtype=sdt) for _ in range(4)]
    masks = [x.new_empty((n, growth_rate, h, w)) if p > 0 else x.new_empty(0) for p in drop_rates]
    bottlenecks = [x.new_empty((n, params[algo.PARAMS_PER_LAYER * i + 2].shape[0], h, w)) if not memory_efficient
                   else x.new_empty(0) for i in range(num_layers)]
    masks = [m.to(torch.bool) if m.numel() else m for m in masks]
    return out, buf, x.new_empty(channels, dtype=sdt), coefs, masks, bottlenecks, new_running


@torch.library.custom_op("densenet_fast::dense_stage_backward", mutates_args=())
def _dense_stage_backward_op(
    grad_out: Tensor, buf: Tensor, mean: Tensor, coefs: list[Tensor], masks: list[Tensor],
    bottlenecks: list[Tensor], params: list[Tensor], ints: list[int], batch_stats: list[bool],
    drop_rates: list[float], in_channels: int, channels_last: bool, needs: list[bool], x_needs: bool, backend: str,
) -> tuple[Tensor, list[Tensor]]:
    """Returns (grad of the stage input, grads of params), with empty tensors for what is not needed."""
    n, _, h, w = buf.shape
    num = len(batch_stats)
    spec = _spec(ints, [0.0] * num, [0.0] * num, batch_stats, [False] * num, [False] * num, [], drop_rates,
                 n * h * w, buf.device)
    saved = algo.Saved(buf, mean, [algo.BNCoefs(*coefs[i:i + 4]) for i in range(0, len(coefs), 4)],
                       [_none_if_empty(m) for m in masks], [_none_if_empty(z) for z in bottlenecks])
    x_format = torch.channels_last if channels_last else torch.contiguous_format
    grad_x, grads = algo.backward(backend_named(backend), spec, saved, grad_out, in_channels, x_format,
                                  _op_params(params, buf.dtype), needs, x_needs)
    empty = buf.new_empty(0)
    return (empty if grad_x is None else grad_x,
            [empty.clone() if g is None else g.to(p.dtype) for g, p in zip(grads, params)])


@_dense_stage_backward_op.register_fake
def _(grad_out, buf, mean, coefs, masks, bottlenecks, params, ints, batch_stats, drop_rates, in_channels,
      channels_last, needs, x_needs, backend):
    n, _, h, w = buf.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    grad_x = buf.new_empty((n, in_channels, h, w)).contiguous(memory_format=fmt) if x_needs else buf.new_empty(0)
    return grad_x, [torch.empty_like(p) if need and p.numel() else buf.new_empty(0) for p, need in zip(params, needs)]


def _setup_context(ctx, inputs, output):
    (x, params, running, ints, eps, momentum, batch_stats, update, has_running, drop_rates, for_backward,
     backend, name) = inputs
    out, buf, mean, coefs, masks, bottlenecks, new_running = output
    num_layers, has_transition = ints[1], ints[2]
    kept = x if num_layers == 0 else (buf if has_transition else out)
    # x itself, for a double backward (stage_autograd.py): saved as a view of the buffer's first
    # channels, which hold its values, so it costs no memory and stays x to autograd.
    # Compiled graphs do not double-backward: they keep no x (a placeholder says so).
    x_saved = x.new_empty(0) if torch.compiler.is_compiling() and kept is not x else x
    with stage_autograd.saved_as_buffer_prefix(x_saved, kept):
        ctx.save_for_backward(kept, mean, *coefs, *masks, *bottlenecks, *params, x_saved)
    ctx.mark_non_differentiable(buf, mean, *coefs, *masks, *bottlenecks, *new_running)
    ctx.set_materialize_grads(False)  # else autograd allocates zero grads as large as the buffer
    ctx.sizes = (len(coefs), len(masks), len(bottlenecks), len(params), len(running))
    ctx.args = (ints, batch_stats, drop_rates, x.shape[1], memory_format(x) == torch.channels_last, backend)
    ctx.name = name
    # Gradients mirror the inputs' structure; torch.library treats an empty list as a list, not a leaf.
    ctx.no_grads = tuple([] if isinstance(a, list) and not a else None for a in inputs[3:])
    ctx.needs = [p.requires_grad for p in params]
    ctx.x_needs = x.requires_grad
    # For a double backward: the math's own settings, and the running stats of the BNs that read them.
    ctx.eps, ctx.batch_stats = eps, batch_stats
    ctx.eval_running = stage_autograd.eval_running_stats(running, has_running, batch_stats)


def _backward(ctx, grad_out, *unused_grads):
    n_coefs, n_masks, n_bottlenecks, n_params, n_running = ctx.sizes
    if grad_out is None:  # grads are not materialized: the output got none
        return (None, [None] * n_params, [None] * n_running) + ctx.no_grads
    saved = ctx.saved_tensors
    kept, mean, x = saved[0], saved[1], saved[-1]
    rest = saved[2:-1]
    coefs, rest = list(rest[:n_coefs]), rest[n_coefs:]
    masks, rest = list(rest[:n_masks]), rest[n_masks:]
    bottlenecks, params = list(rest[:n_bottlenecks]), list(rest[n_bottlenecks:])
    ints, batch_stats, drop_rates, in_channels, channels_last, backend = ctx.args
    if torch.is_grad_enabled():
        # create_graph=True (a gradient penalty, double backward): the gradients through the stage's
        # math in differentiable ops, recomputed from the same inputs and dropout masks.
        if ints[4] >= 0:
            raise NotImplementedError(f"double backward through {ctx.name} with synchronized BatchNorm is not "
                                      "supported (torch.nn.SyncBatchNorm does not support it either)")
        inputs = ([x] if ctx.x_needs else []) + [p for p, need in zip(params, ctx.needs) if need]
        out = stage_autograd.stage_forward(x, params, ints[1], bool(ints[2]), ctx.eps, ctx.batch_stats,
                                           ctx.eval_running, drop_rates, masks)
        found = iter(torch.autograd.grad(out, inputs, grad_out, create_graph=True, allow_unused=True))
        grad_x = next(found) if ctx.x_needs else None
        grads = [next(found) if need else None for need in ctx.needs]
        return (grad_x, grads, [None] * n_running) + ctx.no_grads
    with _out_of_memory_names(ctx.name, kept, "backward"):
        grad_x, grads = torch.ops.densenet_fast.dense_stage_backward(
            grad_out.contiguous(memory_format=memory_format(grad_out)), kept, mean, coefs, masks, bottlenecks,
            params, ints, batch_stats, drop_rates, in_channels, channels_last, ctx.needs, ctx.x_needs, backend)
    grads = [g if need else None for g, need in zip(grads, ctx.needs)]
    return (grad_x if ctx.x_needs else None, grads, [None] * n_running) + ctx.no_grads


_dense_stage_op.register_autograd(_backward, setup_context=_setup_context)


# --- the entry point ------------------------------------------------------------------------------


def _check_input(x: Tensor, stage: Stage, params: Sequence[Optional[Tensor]], autocast: bool) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected a 4-D input (N, C, H, W), got {shape}")
    if x.shape[1] != stage.in_channels:
        raise ValueError(f"expected an input with {stage.in_channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    ref = next(p for p in params if p is not None and p.dim() == 4)  # a conv weight: the compute dtype
    if not x.is_floating_point() or (x.dtype != ref.dtype and not autocast):
        raise TypeError(f"expected input dtype {ref.dtype} (the parameters' dtype), got {x.dtype}")
    if x.device != ref.device:
        raise RuntimeError(f"expected input on {ref.device} (the parameters' device), got {x.device}")
    if stage.transition is not None and (x.shape[2] < 2 or x.shape[3] < 2):
        raise ValueError(f"a transition pools 2x2: expected H and W of at least 2, got {tuple(x.shape[2:])}")


def _group_index(stage: Stage) -> int:
    batch = any(_uses_batch_stats(n) for n in stage.norms())
    sync, group = active_group(stage.sync_batchnorm and batch, stage.process_group)
    if not sync:
        return -1
    for i, known in enumerate(_PROCESS_GROUPS):
        if known is group:
            return i
    _PROCESS_GROUPS.append(group)
    return len(_PROCESS_GROUPS) - 1


def dense_stage(x: Tensor, stage: Stage) -> Tensor:
    """Run ``stage`` on ``x``: the block's feature buffer, or the transition's output if it has one.

    Under torch.autocast the activations and conv weights are in the autocast dtype (as
    torchvision's convs and BNs produce them) while statistics and BN math stay in float32.
    """
    params = stage.params()
    device_type = x.device.type if isinstance(x, Tensor) else "cpu"
    conv_dtype = next((p.dtype for p in params if p is not None and p.dim() == 4), x.dtype)
    cast = autocast_dtype(x, conv_dtype) if isinstance(x, Tensor) else None
    _check_input(x, stage, params, cast is not None)
    if cast is not None:
        x = x.to(cast)
    norms = stage.norms()
    running = []
    has_running = [norm.running_mean is not None for norm in norms]
    for norm in norms:
        if norm.running_mean is not None:
            nbt = norm.num_batches_tracked
            running += [norm.running_mean, norm.running_var, nbt if nbt is not None else x.new_empty(0)]
    batch_stats = [_uses_batch_stats(n) for n in norms]
    update = [n.training and n.track_running_stats and n.running_mean is not None for n in norms]
    drop_rates = [float(layer.drop_rate) if layer.training else 0.0 for layer in stage.layers]
    ints = [stage.growth_rate, len(stage.layers), int(stage.transition is not None), int(stage.memory_efficient),
            _group_index(stage)]
    eps = [float(n.eps) for n in norms]
    momentum = [float("nan") if n.momentum is None else float(n.momentum) for n in norms]
    placeholder = x.new_empty(0)
    op_params = [placeholder if p is None else p for p in params]
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in op_params))
    # The op casts for itself; autocast inside would re-cast every call (and rejects out=).
    with torch.autocast(device_type, enabled=False), _out_of_memory_names(stage.name, x, "forward"):
        out, *_, new_running = torch.ops.densenet_fast.dense_stage(
            x, op_params, running, ints, eps, momentum, batch_stats, update, has_running, drop_rates,
            needs_grad, backend_name_for(x.device, x.dtype), stage.name)
    with torch.no_grad():
        new = iter(new_running)
        for norm, updated in zip(norms, update):
            if updated:
                norm.running_mean.copy_(next(new))
                norm.running_var.copy_(next(new))
                if norm.num_batches_tracked is not None:
                    norm.num_batches_tracked.copy_(next(new))
    return out


# --- FLOP formulas (torch.utils.flop_counter) -------------------------------------------------------
# The model's FLOPs as torchvision defines them (2 per multiply-add of every convolution, a
# transition's conv counted before its pooling, backward as the grads a module-by-module
# backward computes), not the fused op's own work (pooling first is 4x fewer transition FLOPs,
# the bottleneck recompute 1 conv1x1 more per layer): the convention of MFU and of model cards.


def _conv_flops(n: int, h: int, w: int, c_in: int, c_out: int, kernel: int) -> int:
    return 2 * n * h * w * c_in * c_out * kernel * kernel


def _stage_convs(x_shape, params_shapes, ints) -> list[tuple[int, int, int, int]]:
    """(param index of the weight, c_in, c_out, kernel) of every conv of the stage, in order."""
    growth_rate, num_layers, has_transition = ints[0], ints[1], ints[2]
    convs, c = [], x_shape[1]
    for i in range(num_layers):
        base = algo.PARAMS_PER_LAYER * i
        bottleneck = params_shapes[base + 2][0]
        convs += [(base + 2, c, bottleneck, 1), (base + 5, bottleneck, growth_rate, 3)]
        c += growth_rate
    if has_transition:
        convs.append((algo.PARAMS_PER_LAYER * num_layers + 2, c, params_shapes[-1][0], 1))
    return convs


def _dense_stage_flops(x_shape, params_shapes, running, ints, *args, **kwargs) -> int:
    n, _, h, w = x_shape
    return sum(_conv_flops(n, h, w, c_in, c_out, k) for _, c_in, c_out, k in _stage_convs(x_shape, params_shapes, ints))


def _dense_stage_backward_flops(grad_out_shape, buf_shape, mean, coefs, masks, bottlenecks, params_shapes, ints,
                                batch_stats, drop_rates, in_channels, channels_last, needs, x_needs, *args,
                                **kwargs) -> int:
    n, _, h, w = buf_shape
    total, upstream = 0, x_needs  # whether a conv's input depends on something that needs a gradient
    for index, c_in, c_out, k in _stage_convs((n, in_channels, h, w), params_shapes, ints):
        if index % algo.PARAMS_PER_LAYER in (2, 5):  # the BN before this conv: its weight and bias
            upstream = upstream or needs[index - 2] or needs[index - 1]
        flops = _conv_flops(n, h, w, c_in, c_out, k)
        total += flops * (int(upstream) + int(needs[index]))
        upstream = upstream or needs[index]
    return total


def _register_flop_formulas() -> None:
    from torch.utils.flop_counter import register_flop_formula

    register_flop_formula(torch.ops.densenet_fast.dense_stage)(_dense_stage_flops)
    register_flop_formula(torch.ops.densenet_fast.dense_stage_backward)(_dense_stage_backward_flops)


_register_flop_formulas()
