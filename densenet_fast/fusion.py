"""When a stage may run as the fused op, and what happens when it may not.

The fused op (``stage.py``) computes BatchNorm2d -> ReLU -> Conv2d 1x1 -> BatchNorm2d -> ReLU ->
Conv2d 3x3 per layer, and BatchNorm2d -> ReLU -> Conv2d 1x1 -> AvgPool2d(2) for a transition, with
each module's own hyper-parameters. It runs only when that provably is what the modules compute:

* every module of the stage has its exact standard type and the hyper-parameters the op
  implements (a replaced, subclassed or reconfigured module is run as it is);
* nothing observes or rewrites the modules: no forward, pre-forward, backward or full-backward
  hooks, module-global hooks, parametrizations, or old-style weight/spectral norm (pre-hooks);
* nothing traces or transforms the computation: jit scripting and tracing, torch.fx,
  torch.export, forward-mode AD and the torch.func transforms (vmap, grad, jvp, jacfwd...) see
  the modules' own ops.

Otherwise the modules run themselves, exactly as torchvision runs them, and densenet_fast warns
once per reason that the stage lost its memory savings; ``set_fallback("error")`` turns that into
a :class:`FallbackError` for users who would rather know.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils import _python_dispatch

_POLICIES = ("warn", "error")
_ENV_VAR = "DENSENET_FAST_FALLBACK"
_policy: Optional[str] = None
_warned: set[str] = set()


class FallbackError(RuntimeError):
    """Raised instead of running a stage module by module, after ``set_fallback("error")``."""


def set_fallback(policy: Optional[str]) -> None:
    """What a stage does when the fused op cannot compute it: ``"warn"`` (the default) runs the
    modules themselves and warns once per reason; ``"error"`` raises :class:`FallbackError`.
    ``None`` restores the default (or the ``DENSENET_FAST_FALLBACK`` environment variable)."""
    global _policy
    if policy is not None and policy not in _POLICIES:
        raise ValueError(f"unknown fallback policy {policy!r}; expected one of {list(_POLICIES)} or None")
    _policy = policy


def get_fallback() -> str:
    policy = _policy or os.environ.get(_ENV_VAR) or "warn"
    if policy not in _POLICIES:
        raise ValueError(f"{_ENV_VAR}={policy!r}; expected one of {list(_POLICIES)}")
    return policy


def reset_fallback_warnings() -> None:
    """Forget which fallback reasons were warned about, so each warns again once (the warnings are
    once per reason for the whole process: a test or a notebook that wants to see them again)."""
    _warned.clear()


def fall_back(stage_name: str, reason: str) -> None:
    """Called when ``stage_name`` runs module by module because of ``reason``."""
    message = f"densenet_fast: {stage_name} runs module by module, without the memory savings: {reason}"
    if get_fallback() == "error":
        raise FallbackError(message + " (set_fallback('warn') runs it anyway)")
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(message + " (warned once per reason)", UserWarning, stacklevel=3)


# --- what the computation is under -----------------------------------------------------------------


_fx = torch.fx._symbolic_trace
# torch >= 2.13 logs a warning from is_fx_tracing(); the flag itself is what is asked here.
_is_fx_tracing = getattr(_fx, "_get_is_fx_tracing", _fx.is_fx_tracing)


def _is_exporting() -> bool:
    """Whether torch.export is tracing. The flag torch.compiler.is_exporting() returns is read
    directly: torch 2.11's dynamo traces that call as True under torch.compile as well."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def transforming() -> bool:
    """Whether a tracer or transform records the computation (eager checks must then stay out of it)."""
    return (_is_fx_tracing() or torch.jit.is_tracing() or _is_exporting()
            or (not torch.compiler.is_compiling() and (torch._C._functorch.peek_interpreter_stack() is not None
                                                      or torch.autograd.forward_ad._current_level >= 0)))


def context_reason(x) -> Optional[str]:
    """Why nothing may run fused on ``x`` right now, or None."""
    if not isinstance(x, Tensor) or isinstance(x, torch.fx.Proxy) or _is_fx_tracing():
        return "torch.fx is tracing the model"
    if torch.jit.is_tracing():
        return "torch.jit.trace is recording the model"
    if _is_exporting():
        return "torch.export is tracing the model"
    if not torch.compiler.is_compiling():
        # torch.compile keeps the fused op; these are eager-only states.
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return "a torch.func transform (vmap, grad, jvp, jacrev, jacfwd...) is active"
        if torch.autograd.forward_ad._current_level >= 0:
            return "forward-mode AD (torch.autograd.forward_ad.dual_level) is active"
        mode = _python_dispatch._get_current_dispatch_mode()
        if mode is not None:
            return f"a TorchDispatchMode ({type(mode).__name__}) is active: it sees the modules' own aten ops"
        if (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
                or nn.modules.module._global_backward_hooks or nn.modules.module._global_backward_pre_hooks):
            return "module hooks are registered globally (torch.nn.modules.module.register_module_*_hook)"
    if x.device.type == "meta":
        return "the input is on the meta device"
    if x.dim() > 0 and x.shape[0] == 0:
        return "the batch is empty"
    return None


# --- what the modules are ---------------------------------------------------------------------------
# Two forms of the same rules: ``standard_stage`` is the quick yes, run on every forward (plain dict
# reads: nn.Module.__getattr__ and message strings cost ~10 ms per DenseNet-121 step); the
# ``*_reason`` functions below are the authority, run only when the quick check says no, and name
# what differs. A rule added to one must be added to the other.

_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)
_CONV1X1 = ((1, 1), (1, 1), (0, 0), (1, 1), 1, "zeros")
_CONV3X3 = ((3, 3), (1, 1), (1, 1), (1, 1), 1, "zeros")


def _quiet(module: nn.Module) -> bool:
    d = module.__dict__
    return not (d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or d["_backward_pre_hooks"]
                or "parametrizations" in d["_modules"])


def _conv_ok(conv: nn.Module, in_channels: int, form: tuple) -> bool:
    d = conv.__dict__
    return (type(conv) is nn.Conv2d and _quiet(conv) and d["in_channels"] == in_channels
            and (d["kernel_size"], d["stride"], d["padding"], d["dilation"], d["groups"], d["padding_mode"]) == form
            and d["_parameters"]["bias"] is None)


def _norm_ok(norm: nn.Module, channels: int) -> bool:
    return type(norm) in _NORMS and _quiet(norm) and norm.__dict__["num_features"] == channels


def standard_stage(layers: Sequence[nn.Module], layer_class: type, transition: Optional[nn.Module],
                   transition_class: type, in_channels: int) -> bool:
    """Whether every module of the stage is standard (the rules of layer_reason/transition_reason)."""
    channels, growth = in_channels, None
    for layer in layers:
        m = layer.__dict__["_modules"]
        norm1, relu1, conv1 = m.get("norm1"), m.get("relu1"), m.get("conv1")
        norm2, relu2, conv2 = m.get("norm2"), m.get("relu2"), m.get("conv2")
        if type(layer) is not layer_class or "forward" in layer.__dict__ or type(conv1) is not nn.Conv2d \
                or type(conv2) is not nn.Conv2d:
            return False
        bottleneck = conv1.__dict__["out_channels"]
        new = conv2.__dict__["out_channels"]
        if not (_norm_ok(norm1, channels) and type(relu1) is nn.ReLU and _quiet(relu1)
                and _conv_ok(conv1, channels, _CONV1X1) and _norm_ok(norm2, bottleneck)
                and type(relu2) is nn.ReLU and _quiet(relu2) and _conv_ok(conv2, bottleneck, _CONV3X3)
                and (growth is None or new == growth) and 0.0 <= float(layer.__dict__["drop_rate"]) <= 1.0):
            return False
        channels, growth = channels + new, new
    if transition is not None:
        m = transition.__dict__["_modules"]
        if type(transition) is not transition_class or "forward" in transition.__dict__ \
                or list(m) != ["norm", "relu", "conv", "pool"]:
            return False
        pool = m["pool"].__dict__
        if not (_norm_ok(m["norm"], channels) and type(m["relu"]) is nn.ReLU and _quiet(m["relu"])
                and _conv_ok(m["conv"], channels, _CONV1X1) and type(m["pool"]) is nn.AvgPool2d and _quiet(m["pool"])
                and pool["kernel_size"] in (2, (2, 2)) and pool["stride"] in (2, (2, 2))
                and pool["padding"] in (0, (0, 0)) and not pool["ceil_mode"] and pool["divisor_override"] is None):
            return False
    return True



def _hook_reason(module: nn.Module, name: str) -> Optional[str]:
    if module._forward_hooks or module._forward_pre_hooks:
        return f"{name} has forward hooks"
    if module._backward_hooks or module._backward_pre_hooks:
        return f"{name} has backward hooks"
    if parametrize.is_parametrized(module):
        return f"{name} is parametrized"
    return None


def _norm_reason(norm: nn.Module, name: str, channels: int) -> Optional[str]:
    if type(norm) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return f"{name} is {type(norm).__name__}, not BatchNorm2d"
    if norm.num_features != channels:
        return f"{name} normalizes {norm.num_features} channels, expected {channels}"
    return None


def _conv_reason(conv: nn.Module, name: str, in_channels: int, kernel: int) -> Optional[str]:
    if type(conv) is not nn.Conv2d:
        return f"{name} is {type(conv).__name__}, not Conv2d"
    expected = dict(kernel_size=(kernel, kernel), stride=(1, 1), padding=(kernel // 2, kernel // 2),
                    dilation=(1, 1), groups=1, padding_mode="zeros", in_channels=in_channels)
    differ = [attr for attr, value in expected.items() if getattr(conv, attr) != value]
    if differ:
        has = ", ".join(f"{attr}={getattr(conv, attr)!r}" for attr in differ)
        implemented = ", ".join(f"{attr}={expected[attr]!r}" for attr in differ)
        return f"{name} has {has}; the fused op implements {implemented}"
    if conv.bias is not None:
        return f"{name} has a bias"
    return None


def _relu_reason(relu: nn.Module, name: str) -> Optional[str]:
    return None if type(relu) is nn.ReLU else f"{name} is {type(relu).__name__}, not ReLU"


def _first(reasons) -> Optional[str]:
    return next((r for r in reasons if r is not None), None)


def _children(module: nn.Module, names: Sequence[str], name: str) -> tuple[Optional[str], list[nn.Module]]:
    found = dict(module.named_children())
    missing = [n for n in names if n not in found]
    if missing:
        return f"{name} has no {missing[0]}", []
    return None, [found[n] for n in names]


def layer_reason(layer: nn.Module, layer_class: type, name: str, in_channels: int,
                 growth_rate: Optional[int]) -> Optional[str]:
    """Why ``layer`` is not a standard dense layer reading ``in_channels`` channels, or None."""
    if type(layer) is not layer_class:
        return f"{name} is {type(layer).__name__}, not a densenet_fast dense layer"
    if "forward" in layer.__dict__:
        return f"{name}.forward is replaced"
    names = ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2")
    missing, children = _children(layer, names, name)
    if missing:
        return missing
    norm1, relu1, conv1, norm2, relu2, conv2 = children
    bottleneck = getattr(conv1, "out_channels", None)
    reason = _first([
        _first(_hook_reason(m, f"{name}.{n}") for n, m in zip(names, (norm1, relu1, conv1, norm2, relu2, conv2))),
        _norm_reason(norm1, f"{name}.norm1", in_channels), _relu_reason(relu1, f"{name}.relu1"),
        _conv_reason(conv1, f"{name}.conv1", in_channels, 1),
        _norm_reason(norm2, f"{name}.norm2", bottleneck), _relu_reason(relu2, f"{name}.relu2"),
        _conv_reason(conv2, f"{name}.conv2", bottleneck, 3),
    ])
    if reason is None and growth_rate is not None and conv2.out_channels != growth_rate:
        reason = f"{name}.conv2 adds {conv2.out_channels} channels, the block's other layers {growth_rate}"
    if reason is None and not 0.0 <= float(layer.drop_rate) <= 1.0:
        reason = f"{name}.drop_rate is {layer.drop_rate!r}"
    return reason


def transition_reason(transition: nn.Module, transition_class: type, name: str, in_channels: int) -> Optional[str]:
    """Why ``transition`` is not the standard BN-ReLU-conv1x1-AvgPool2d(2), or None."""
    if type(transition) is not transition_class:
        return f"{name} is {type(transition).__name__}, not a densenet_fast transition"
    if "forward" in transition.__dict__:
        return f"{name}.forward is replaced"
    names = ["norm", "relu", "conv", "pool"]
    if [n for n, _ in transition.named_children()] != names:
        return f"{name} holds {[n for n, _ in transition.named_children()]}, expected {names}"
    norm, relu, conv, pool = (getattr(transition, n) for n in names)
    reason = _first([
        _first(_hook_reason(m, f"{name}.{n}") for n, m in zip(names, (norm, relu, conv, pool))),
        _norm_reason(norm, f"{name}.norm", in_channels), _relu_reason(relu, f"{name}.relu"),
        _conv_reason(conv, f"{name}.conv", in_channels, 1),
    ])
    if reason is None:
        if type(pool) is not nn.AvgPool2d:
            return f"{name}.pool is {type(pool).__name__}, not AvgPool2d"
        pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
        if (pair(pool.kernel_size), pair(pool.stride), pair(pool.padding), pool.ceil_mode,
                pool.divisor_override) != ((2, 2), (2, 2), (0, 0), False, None):
            return f"{name}.pool is {pool}, the fused op implements AvgPool2d(kernel_size=2, stride=2)"
    return reason


def autocast_dtype(x: Tensor, conv_dtype: torch.dtype) -> Optional[torch.dtype]:
    """The dtype autocast gives the stage's convolutions, or None where it leaves them alone
    (autocast off, or float64, which autocast never casts)."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type) or torch.float64 in (x.dtype, conv_dtype):
        return None
    return torch.get_autocast_dtype(device_type)


def tensors_reason(x: Tensor, convs: Sequence[Tensor], norm_params: Sequence[Optional[Tensor]]) -> Optional[str]:
    """Why the fused op would not compute in the dtypes and on the device the modules would, or None.

    Without autocast the modules compute in the input's dtype: convolution weights must have it,
    BatchNorm parameters it or float32 (a half model with float32 BatchNorms). Under autocast the
    op casts the input and the weights to the autocast dtype, as autocast's convolutions do.
    """
    if not x.is_floating_point():
        return f"the input is {x.dtype}"
    dtypes = {w.dtype for w in convs}
    if len(dtypes) > 1:
        return f"the stage's convolutions mix dtypes {sorted(map(str, dtypes))}"
    conv_dtype = dtypes.pop() if dtypes else x.dtype
    cast = autocast_dtype(x, conv_dtype)
    if cast is None and conv_dtype != x.dtype:
        return f"the input is {x.dtype} and the stage's convolutions {conv_dtype}"
    compute = cast or conv_dtype
    allowed = {compute, torch.float32} if compute in (torch.float16, torch.bfloat16) else {compute}
    if cast is not None:
        allowed.add(conv_dtype)
    for p in norm_params:
        if p is not None and p.dtype not in allowed:
            return f"a BatchNorm of the stage holds {p.dtype} parameters, its convolutions compute in {compute}"
    devices = {t.device for t in convs} | {p.device for p in norm_params if p is not None}
    if devices != {x.device}:
        return f"the input is on {x.device} and the stage's parameters on {sorted(map(str, devices))}"
    return None
