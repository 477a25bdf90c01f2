"""A dense block (and the transition after it) as one registered custom op with its own backward.

``dense_stage(x, Stage(...))`` is what the models call. It turns the stage's modules into plain
numbers and tensors and calls ``densenet_fast::dense_stage``, a ``torch.library`` custom op whose
backward is another custom op, so the whole stage is one autograd node in eager mode and one
opaque node that ``torch.compile`` traces without graph breaks. The math is in
``stage_algorithm.py``.

Running stats are updated exactly once per training forward: the op returns the stage's batch
statistics packed in one tensor and the wrapper updates every module buffer of the stage from it
with a few ``_foreach`` ops (custom ops with autograd must be functional). No step reads a tensor
back to the host.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from . import stage_algorithm as algo, stage_autograd
from .bn_math import update_running_stats
from .fusion import autocast_dtype
from .ops import backend_name_for, backend_named
from .ops.interface import memory_format, stats_dtype
from .stage_sync import BatchSync, active_group

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
# Arguments: the stage as ``ints`` and ``floats`` (stage_algorithm.encode writes them, decode reads
# them back, cached); ``params`` with empty placeholders for absent BN weights and biases;
# ``running`` the running (mean, var) of each BN that normalizes with them (eval mode).


def _batch_sync(spec: algo.StageSpec, x: Tensor) -> Optional[BatchSync]:
    if spec.group_index < 0:
        return None
    n, _, h, w = x.shape
    return BatchSync(_PROCESS_GROUPS[spec.group_index], n * h * w, x.device)


def _casts_weights(params: Sequence[Tensor], dtype: torch.dtype) -> bool:
    """Whether the conv weights (4-D) need a cast to the activations' dtype (under autocast)."""
    return any(p.dim() == 4 and p.dtype != dtype for p in params)


def _op_params(spec: algo.StageSpec, params: Sequence[Tensor],
               weights: Sequence[Tensor] = ()) -> list[Optional[Tensor]]:
    """Parameters as the algorithm takes them: None for absent BN parameters, conv weights
    replaced by ``weights`` (their casts) when given."""
    out: list[Optional[Tensor]] = list(params)
    for j in range(len(spec.eps)):
        base = algo.PARAMS_PER_LAYER * (j // 2) + (3 * (j % 2) if j < 2 * spec.num_layers else 0)
        if not spec.has_weight[j]:
            out[base] = None
        if not spec.has_bias[j]:
            out[base + 1] = None
    if weights:
        convs = iter(weights)
        out = [next(convs) if p is not None and p.dim() == 4 else p for p in out]
    return out


@torch.library.custom_op("densenet_fast::dense_stage", mutates_args=())
def _dense_stage_op(
    x: Tensor, params: list[Tensor], running: list[Tensor], ints: list[int], floats: list[float],
    for_backward: bool, backend: str, name: str,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """Returns (output, buffer or empty, packed numbers, masks, bottlenecks, cast conv weights).

    The packed numbers (stage_algorithm's Layout) hold the stage's batch statistics, from which the
    caller updates the running stats, and the BN coefficients backward reads. Conv weights cast to
    the activations' dtype (autocast) come back so that backward does not cast them again.
    """
    spec = algo.decode(ints, floats)
    weights = [p.to(x.dtype) for p in params if p.dim() == 4] if _casts_weights(params, x.dtype) else []
    out, saved, packed = algo.forward(backend_named(backend), x, spec, _op_params(spec, params, weights), running,
                                      _batch_sync(spec, x), for_backward)
    empty = x.new_empty(0)
    if saved is None:
        return out, empty, packed, [], [], []
    buf = saved.buf if (spec.num_layers > 0 and spec.has_transition) else empty
    return out, buf, packed, saved.masks, saved.bottlenecks, weights if for_backward else []


@_dense_stage_op.register_fake
def _(x, params, running, ints, floats, for_backward, backend, name):
    spec = algo.decode(ints, floats)
    n, _, h, w = x.shape
    fmt, sdt = memory_format(x), stats_dtype(x.dtype)
    buf_shape = (n, spec.channels, h, w)
    if spec.has_transition:
        out = x.new_empty((n, params[-1].shape[0], h // 2, w // 2)).contiguous(memory_format=fmt)
    else:
        out = x.new_empty(buf_shape).contiguous(memory_format=fmt)
    packed = x.new_empty(spec.layout.size, dtype=sdt)
    empty = x.new_empty(0)
    if not for_backward:
        return out, empty, packed, [], [], []
    buf = x.new_empty(buf_shape).contiguous(memory_format=fmt) if (spec.num_layers and spec.has_transition) else empty
    masks = [x.new_empty((n, spec.growth_rate, h, w), dtype=torch.bool) for p in spec.drop_rates if p > 0]
    # The kept bottlenecks have the backend's layout (the cpp backend's are channels_last in float32).
    z_format = backend_named(backend).bottleneck_memory_format
    bottlenecks = [] if spec.memory_efficient else [
        torch.empty((n, b, h, w), dtype=x.dtype, device=x.device, memory_format=z_format(x.dtype, b))
        for b in spec.bottlenecks]
    weights = [torch.empty_like(p, dtype=x.dtype) for p in params if p.dim() == 4] \
        if _casts_weights(params, x.dtype) else []
    return out, buf, packed, masks, bottlenecks, weights


@torch.library.custom_op("densenet_fast::dense_stage_backward", mutates_args=())
def _dense_stage_backward_op(
    grad_out: Tensor, buf: Tensor, packed: Tensor, masks: list[Tensor], bottlenecks: list[Tensor],
    params: list[Tensor], weights: list[Tensor], ints: list[int], floats: list[float], channels_last: bool,
    needs: list[bool], x_needs: bool, backend: str,
) -> tuple[Tensor, list[Tensor]]:
    """Returns (grad of the stage input, grads of params), with empty tensors for what is not needed."""
    spec = algo.decode(ints, floats)
    saved = algo.Saved(buf, packed, masks, bottlenecks)
    x_format = torch.channels_last if channels_last else torch.contiguous_format
    grad_x, grads = algo.backward(backend_named(backend), spec, saved, grad_out, x_format,
                                  _op_params(spec, params, weights), needs, x_needs, _batch_sync(spec, buf))
    return (buf.new_empty(0) if grad_x is None else grad_x,
            [buf.new_empty(0) if g is None else (g if g.dtype == p.dtype else g.to(p.dtype))
             for g, p in zip(grads, params)])


@_dense_stage_backward_op.register_fake
def _(grad_out, buf, packed, masks, bottlenecks, params, weights, ints, floats, channels_last, needs, x_needs,
      backend):
    n, _, h, w = buf.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    c0 = algo.decode(ints, floats).in_channels
    grad_x = buf.new_empty((n, c0, h, w)).contiguous(memory_format=fmt) if x_needs else buf.new_empty(0)
    # Parameter grads come back contiguous (the backends' ConvGrads), in the parameters' dtype.
    return grad_x, [p.new_empty(p.shape) if need and p.numel() else buf.new_empty(0) for p, need in zip(params, needs)]


class _InputAsBufferPrefix:
    """Saved-tensor hooks for one stage node: its input is kept as the first channels of its buffer.

    The node saves its input x for a double backward (stage_autograd.py), which differentiates
    through it. Saved as is, autograd would keep x's own storage alive (one block input per
    stage, 6 MiB of DenseNet-121's peak at batch 8, 224x224), although the kept buffer already
    holds x's values in its first channels. So the pack hook stores a reference to those, and
    autograd's unpack makes of them a tensor in x's place in the graph. Every saved tensor is
    checked on unpack for in-place changes, as autograd checks the tensors it saves itself.
    Used only where no other saved-tensor hooks are active (checkpointing, save_on_cpu keep theirs).
    """

    _current = threading.local()  # the hooks of the op call in progress, for _setup_context

    def __init__(self, x: Tensor):
        self.x, self.kept, self.channels = x, None, 0

    @classmethod
    def usable(cls) -> bool:
        if torch.compiler.is_compiling():
            return False
        top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
        return top is not None and top(False) is None and torch._C._autograd._saved_tensors_hooks_is_enabled()

    @classmethod
    def note_kept(cls, x: Tensor, kept: Tensor, channels: int) -> None:
        hooks = getattr(cls._current, "hooks", None)
        if hooks is not None and hooks.x is x and kept is not x:
            hooks.kept, hooks.channels = kept, channels

    # Packed: (tensor, its version at save time[, how many of its first channels are the saved
    # tensor]). Detached where it has a grad_fn: a saved output must not hold its own node.
    def pack(self, t: Tensor) -> tuple:
        if t is self.x and self.kept is not None:
            return self.kept.detach(), self.kept._version, self.channels
        return (t if t.grad_fn is None else t.detach()), t._version

    @staticmethod
    def unpack(packed: tuple) -> Tensor:
        t, version = packed[0], packed[1]
        if t._version != version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: a {tuple(t.shape)} tensor saved by a densenet_fast stage is at version "
                f"{t._version}; expected version {version} instead.")
        return t if len(packed) == 2 else t[:, :packed[2]]

    def __enter__(self):
        self._current.hooks = self
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()

    def __exit__(self, *exc):
        self._current.hooks = None
        self._hooks.__exit__(*exc)
        # The packed objects hold what backward needs; autograd keeps the hooks (bound to self)
        # while the graph lives, so self lets go of the tensors and of its hooks object (a cycle).
        self.x = self.kept = self._hooks = None


def _setup_context(ctx, inputs, output):
    x, params, running, ints, floats, for_backward, backend, name = inputs
    out, buf, packed, masks, bottlenecks, weights = output
    spec = algo.decode(ints, floats)
    kept = x if spec.num_layers == 0 else (buf if spec.has_transition else out)
    # x itself, for a double backward (stage_autograd.py), which must differentiate through it:
    # kept as the buffer's first channels where dense_stage's hooks are active. Compiled graphs
    # do not double-backward: they keep no x (a placeholder says so).
    _InputAsBufferPrefix.note_kept(x, kept, spec.in_channels)
    x_saved = x.new_empty(0) if torch.compiler.is_compiling() and kept is not x else x
    ctx.save_for_backward(kept, packed, *masks, *bottlenecks, *params, *weights, x_saved)
    ctx.mark_non_differentiable(buf, packed, *masks, *bottlenecks, *weights)
    ctx.set_materialize_grads(False)  # else autograd allocates zero grads as large as the buffer
    ctx.sizes = (len(masks), len(bottlenecks), len(params), len(running))
    ctx.args = (ints, floats, memory_format(x) == torch.channels_last, backend)
    ctx.name = name
    # Gradients mirror the inputs' structure; torch.library treats an empty list as a list, not a leaf.
    ctx.no_grads = tuple([] if isinstance(a, list) and not a else None for a in inputs[3:])
    ctx.needs = [p.requires_grad for p in params]
    ctx.x_needs = x.requires_grad
    # For a double backward: the running stats of the BNs that read them.
    ctx.eval_running = stage_autograd.eval_running_stats(running, spec.batch_stats)


def _backward(ctx, grad_out, *unused_grads):
    n_masks, n_bottlenecks, n_params, n_running = ctx.sizes
    if grad_out is None:  # grads are not materialized: the output got none
        return (None, [None] * n_params, [None] * n_running) + ctx.no_grads
    saved = ctx.saved_tensors
    kept, packed, x = saved[0], saved[1], saved[-1]
    rest = saved[2:-1]
    masks, rest = list(rest[:n_masks]), rest[n_masks:]
    bottlenecks, rest = list(rest[:n_bottlenecks]), rest[n_bottlenecks:]
    params, weights = list(rest[:n_params]), list(rest[n_params:])
    ints, floats, channels_last, backend = ctx.args
    if torch.is_grad_enabled():
        # create_graph=True (a gradient penalty, double backward): the gradients through the stage's
        # math in differentiable ops, recomputed from the same inputs and dropout masks.
        spec = algo.decode(ints, floats)
        if spec.group_index >= 0:
            raise NotImplementedError(f"double backward through {ctx.name} with synchronized BatchNorm is not "
                                      "supported (torch.nn.SyncBatchNorm does not support it either)")
        inputs = ([x] if ctx.x_needs else []) + [p for p, need in zip(params, ctx.needs) if need]
        all_masks = iter(masks)
        layer_masks = [next(all_masks) if p > 0 else None for p in spec.drop_rates]
        out = stage_autograd.stage_forward(x, params, spec.num_layers, spec.has_transition, spec.eps,
                                           spec.batch_stats, ctx.eval_running, spec.drop_rates, layer_masks)
        found = iter(torch.autograd.grad(out, inputs, grad_out, create_graph=True, allow_unused=True))
        grad_x = next(found) if ctx.x_needs else None
        grads = [next(found) if need else None for need in ctx.needs]
        return (grad_x, grads, [None] * n_running) + ctx.no_grads
    with _out_of_memory_names(ctx.name, kept, "backward"):
        grad_x, grads = torch.ops.densenet_fast.dense_stage_backward(
            grad_out.contiguous(memory_format=memory_format(grad_out)), kept, packed, masks, bottlenecks,
            params, weights, ints, floats, channels_last, ctx.needs, ctx.x_needs, backend)
    grads = [g if need else None for g, need in zip(grads, ctx.needs)]
    return (grad_x if ctx.x_needs else None, grads, [None] * n_running) + ctx.no_grads


_dense_stage_op.register_autograd(_backward, setup_context=_setup_context)


# --- the entry point ------------------------------------------------------------------------------


def _check_input(x: Tensor, stage: Stage, params: Sequence[Optional[Tensor]], autocast: bool) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected a 4-D input (N, C, H, W), got {shape}")
    if x.shape[1] != stage.in_channels:
        raise ValueError(f"expected an input with {stage.in_channels} channels, got {x.shape[1]} "
                         f"(shape {tuple(x.shape)})")
    ref = next(p for p in params if p is not None and p.dim() == 4)  # a conv weight: the compute dtype
    if not x.is_floating_point() or (x.dtype != ref.dtype and not autocast):
        raise TypeError(f"expected input dtype {ref.dtype} (the parameters' dtype), got {x.dtype}")
    if x.device != ref.device:
        raise RuntimeError(f"expected input on {ref.device} (the parameters' device), got {x.device}")
    if stage.transition is not None and (x.shape[2] < 2 or x.shape[3] < 2):
        raise ValueError(f"a transition pools 2x2: expected H and W of at least 2, got {tuple(x.shape[2:])}")


def _group_index(stage: Stage, batch_stats: Sequence[bool]) -> int:
    sync, group = active_group(stage.sync_batchnorm and any(batch_stats), stage.process_group)
    if not sync:
        return -1
    for i, known in enumerate(_PROCESS_GROUPS):
        if known is group:
            return i
    _PROCESS_GROUPS.append(group)
    return len(_PROCESS_GROUPS) - 1


def _encode(stage: Stage, norms: Sequence[nn.BatchNorm2d]) -> tuple[list[int], list[float], list[Tensor]]:
    """The op's (ints, floats, running) for ``stage``: the one place a stage becomes op arguments."""
    batch_stats = [_uses_batch_stats(n) for n in norms]
    ints, floats = algo.encode(
        stage.in_channels, stage.growth_rate, len(stage.layers), stage.transition is not None,
        stage.memory_efficient, _group_index(stage, batch_stats), [layer.conv1.out_channels for layer in stage.layers],
        [float(n.eps) for n in norms], batch_stats, [n.weight is not None for n in norms],
        [n.bias is not None for n in norms],
        [float(layer.drop_rate) if layer.training else 0.0 for layer in stage.layers])
    running = [t for n, batch in zip(norms, batch_stats) if not batch for t in (n.running_mean, n.running_var)]
    return ints, floats, running


def _update_running_stats(norms: Sequence[nn.BatchNorm2d], spec: algo.StageSpec, packed: Tensor) -> None:
    """Every running stat of the stage from the op's packed batch statistics: a few _foreach ops."""
    updated = [j for j, n in enumerate(norms)
               if spec.batch_stats[j] and n.training and n.track_running_stats and n.running_mean is not None]
    if not updated:
        return
    with torch.no_grad():
        update_running_stats(
            [(norms[j].running_mean, norms[j].running_var, norms[j].num_batches_tracked) for j in updated],
            [norms[j].momentum for j in updated], [algo.batch_stats_of(packed, spec.layout, j) for j in updated])


def dense_stage(x: Tensor, stage: Stage) -> Tensor:
    """Run ``stage`` on ``x``: the block's feature buffer, or the transition's output if it has one.

    Under torch.autocast the activations and conv weights are in the autocast dtype (as
    torchvision's convs and BNs produce them) while statistics and BN math stay in float32.
    """
    if not torch.compiler.is_compiling():
        register_flop_formulas()
    params = stage.params()
    device_type = x.device.type if isinstance(x, Tensor) else "cpu"
    conv_dtype = next((p.dtype for p in params if p is not None and p.dim() == 4), x.dtype)
    cast = autocast_dtype(x, conv_dtype) if isinstance(x, Tensor) else None
    _check_input(x, stage, params, cast is not None)
    if cast is not None:
        x = x.to(cast)
    norms = stage.norms()
    ints, floats, running = _encode(stage, norms)
    placeholder = x.new_empty(0)
    op_params = [placeholder if p is None else p for p in params]
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in op_params))
    # The op casts for itself; autocast inside would re-cast every call (and rejects out=).
    saves = _InputAsBufferPrefix(x) if needs_grad and stage.layers and _InputAsBufferPrefix.usable() \
        else contextlib.nullcontext()
    with torch.autocast(device_type, enabled=False), _out_of_memory_names(stage.name, x, "forward"), saves:
        out, _, packed, *_ = torch.ops.densenet_fast.dense_stage(
            x, op_params, running, ints, floats, needs_grad, backend_name_for(x.device, x.dtype), stage.name)
    _update_running_stats(norms, algo.decode(ints, floats), packed)
    return out


# --- FLOP formulas (torch.utils.flop_counter) -------------------------------------------------------
# The model's FLOPs as torchvision defines them (2 per multiply-add of every convolution, a
# transition's conv counted before its pooling, backward as the grads a module-by-module
# backward computes), not the fused op's own work (pooling first is 4x fewer transition FLOPs,
# the bottleneck recompute 1 conv1x1 more per layer): the convention of MFU and of model cards.


def _conv_flops(n: int, h: int, w: int, c_in: int, c_out: int, kernel: int) -> int:
    return 2 * n * h * w * c_in * c_out * kernel * kernel


def _stage_convs(x_shape, params_shapes, spec: algo.StageSpec) -> list[tuple[int, int, int, int]]:
    """(param index of the weight, c_in, c_out, kernel) of every conv of the stage, in order."""
    growth_rate, num_layers, has_transition = spec.growth_rate, spec.num_layers, spec.has_transition
    convs, c = [], x_shape[1]
    for i in range(num_layers):
        base = algo.PARAMS_PER_LAYER * i
        bottleneck = params_shapes[base + 2][0]
        convs += [(base + 2, c, bottleneck, 1), (base + 5, bottleneck, growth_rate, 3)]
        c += growth_rate
    if has_transition:
        convs.append((algo.PARAMS_PER_LAYER * num_layers + 2, c, params_shapes[-1][0], 1))
    return convs


def _dense_stage_flops(x_shape, params_shapes, running, ints, floats, *args, **kwargs) -> int:
    n, _, h, w = x_shape
    convs = _stage_convs(x_shape, params_shapes, algo.decode(ints, floats))
    return sum(_conv_flops(n, h, w, c_in, c_out, k) for _, c_in, c_out, k in convs)


def _dense_stage_backward_flops(grad_out_shape, buf_shape, packed, masks, bottlenecks, params_shapes, weights, ints,
                                floats, channels_last, needs, x_needs, *args, **kwargs) -> int:
    n, _, h, w = buf_shape
    spec = algo.decode(ints, floats)
    total, upstream = 0, x_needs  # whether a conv's input depends on something that needs a gradient
    for index, c_in, c_out, k in _stage_convs((n, spec.in_channels, h, w), params_shapes, spec):
        if index % algo.PARAMS_PER_LAYER in (2, 5):  # the BN before this conv: its weight and bias
            upstream = upstream or needs[index - 2] or needs[index - 1]
        flops = _conv_flops(n, h, w, c_in, c_out, k)
        total += flops * (int(upstream) + int(needs[index]))
        upstream = upstream or needs[index]
    return total


_flop_formulas_registered = False


def register_flop_formulas() -> None:
    """Register the formulas once torch.utils.flop_counter is loaded (importing it at our import would
    pull in triton: a FlopCounterMode can only be active once it is loaded, so this runs in time)."""
    global _flop_formulas_registered
    if _flop_formulas_registered or "torch.utils.flop_counter" not in sys.modules:
        return
    from torch.utils.flop_counter import register_flop_formula

    register_flop_formula(torch.ops.densenet_fast.dense_stage)(_dense_stage_flops)
    register_flop_formula(torch.ops.densenet_fast.dense_stage_backward)(_dense_stage_backward_flops)
    _flop_formulas_registered = True
