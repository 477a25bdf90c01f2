"""Drop-in DenseNets: torchvision's modules, names and signatures, with the block algorithm inside.

Parameter and buffer names are torchvision's (``features.denseblock1.denselayer1.norm1.weight``,
``features.transition1.conv.weight``, ``classifier.weight``...), so state_dicts load both ways.
Every module's forward is torchvision's, module by module; a dense block (with the transition
after it) instead runs as one fused node (``densenet_fast.stage``) when ``densenet_fast.fusion``
finds that node computes exactly what the modules say. TorchScript compiles only the modules'
own path (the fused one is ``torch.jit.unused``).
"""
# No ``from __future__ import annotations``: torch.fx writes forward's annotations into the code it
# generates, which TorchScript compiles (a string annotation is an unknown type name there).
import re
from collections import OrderedDict
from typing import Any, List, Optional, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor, nn

from . import fusion
from .stage import Stage, dense_stage

# Old torchvision checkpoints name a layer's modules 'norm.1', 'conv.2', ...
_LEGACY_LAYER_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                               r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")


class _DenseLayer(nn.Module):
    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float,
                 memory_efficient: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def bn_function(self, inputs: List[Tensor]) -> Tensor:
        return self.conv1(self.relu1(self.norm1(torch.cat(inputs, 1))))

    @torch.jit.unused
    def _checkpoints(self, inputs: List[Tensor]) -> bool:
        # torchvision's rule. Tracers and transforms (which cannot branch on requires_grad, or do
        # not compose with checkpointing) compute directly: the numbers are the same either way.
        if not self.memory_efficient or not isinstance(inputs[0], Tensor) or fusion.transforming():
            return False
        return any(t.requires_grad for t in inputs)

    @torch.jit.unused
    def _checkpointed_bottleneck(self, inputs: List[Tensor]) -> Tensor:
        # torchvision's checkpointing, made exact: its recompute in backward updates norm1's running
        # stats a second time (and steps a spectral norm's power iteration again). Here the
        # recompute starts from the buffers as the forward found them and leaves them as the forward
        # left them, so the numbers are memory_efficient=False's, as on the fused path.
        modules = (self.norm1, self.relu1, self.conv1)
        before = _buffer_values(modules)
        calls = []

        def bottleneck(*features: Tensor) -> Tensor:
            calls.append(None)
            if len(calls) == 1:
                return self.bn_function(list(features))
            after = _buffer_values(modules)
            _set_buffers(modules, before)
            try:
                return self.bn_function(list(features))
            finally:
                _set_buffers(modules, after)

        return cp.checkpoint(bottleneck, *inputs, use_reentrant=False)

    def forward(self, input: Union[Tensor, List[Tensor]]) -> Tensor:
        """The layer's new features from its input or the list of earlier features (torchvision's API)."""
        prev_features = [input] if isinstance(input, Tensor) else input
        if torch.jit.is_scripting():
            bottleneck = self.bn_function(prev_features)
        elif self._checkpoints(prev_features):
            bottleneck = self._checkpointed_bottleneck(prev_features)
        else:
            bottleneck = self.bn_function(prev_features)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            legacy = _LEGACY_LAYER_KEY.match(key)
            if legacy:
                state_dict[legacy.group(1) + legacy.group(2)] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _buffer_values(modules) -> list[list[Tensor]]:
    with torch.no_grad():
        return [[b.clone() for b in m.buffers()] for m in modules]


def _set_buffers(modules, values: list[list[Tensor]]) -> None:
    with torch.no_grad():
        for m, saved in zip(modules, values):
            for b, v in zip(m.buffers(), saved):
                b.copy_(v)


class _DenseBlock(nn.ModuleDict):
    _version = 2
    # Set by densenet_fast.convert_sync_batchnorm.
    sync_batchnorm = False
    process_group = None
    stage_name = "a dense block"  # for messages; DenseNet names its blocks 'features.denseblock1', ...

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float, memory_efficient: bool = True) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate, memory_efficient)
            self.add_module(f"denselayer{i + 1}", layer)

    def stage(self, transition: Optional["_Transition"] = None, name: Optional[str] = None) -> Stage:
        """The fused node of this block (and ``transition``), for ``densenet_fast.stage.dense_stage``."""
        if name is None:
            name = self.stage_name + (f" + {transition.stage_name}" if transition is not None else "")
        layers = list(self.values())
        sync, group = _sync_of(layers, transition, self, transition)
        return Stage(layers, transition, all(layer.memory_efficient for layer in layers), name, sync, group)

    def forward(self, init_features: Tensor) -> Tensor:
        """All features of the block, N x (C0 + L*k) x H x W, as torchvision's block returns them."""
        if not torch.jit.is_scripting():
            fused = _run_fused(init_features, self, None, output_escapes=True)
            if fused is not None:
                return fused
        features = [init_features]
        for _name, layer in self.items():
            new_features = layer(features)
            features.append(new_features)
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    sync_batchnorm = False
    process_group = None
    stage_name = "a transition"

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            fused = _run_fused(input, None, self)
            if fused is not None:
                return fused
        for module in self:
            input = module(input)
        return input


def _reads_without_modifying(module: Optional[nn.Module]) -> bool:
    """Whether ``module`` is a BatchNorm of torch's or ours (which never modify their input) without hooks."""
    return (isinstance(module, nn.modules.batchnorm._BatchNorm) and not _own_hooks(module)
            and type(module).__module__.startswith(("torch.nn.", "densenet_fast.")))


def _own_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _sync_of(layers, transition, block, transition_module) -> tuple[bool, Any]:
    """Synchronized statistics: torch.nn.SyncBatchNorm modules, or convert_sync_batchnorm's flags."""
    norms = [n for layer in layers for n in (layer.norm1, layer.norm2)]
    norms += [transition.norm] if transition is not None else []
    if norms and all(type(n) is nn.SyncBatchNorm for n in norms):
        return True, norms[0].process_group
    flagged = [m for m in (block, transition_module) if m is not None and m.sync_batchnorm]
    if flagged:
        return True, flagged[0].process_group
    return False, None


def _stage_reason(x: Tensor, block: Optional[_DenseBlock], transition: Optional[_Transition]) -> Optional[str]:
    """Why ``block`` (and ``transition``) cannot run as one fused node on ``x``, or None."""
    reason = fusion.context_reason(x)
    if reason is not None:
        return reason
    _check_stage_input(x, block, transition)
    layers = list(block.values()) if block is not None else []
    if not layers and transition is None:
        return f"{block.stage_name} has no layers"
    if not fusion.standard_stage(layers, _DenseLayer, transition, _Transition, x.shape[1]):
        reason = _module_reason(x, block, transition)
        if reason is not None:
            return reason
    # Plain dict reads: this runs on every forward (see fusion.standard_stage).
    modules = [layer.__dict__["_modules"] for layer in layers]
    norms = [n for m in modules for n in (m["norm1"], m["norm2"])]
    convs = [c.__dict__["_parameters"]["weight"] for m in modules for c in (m["conv1"], m["conv2"])]
    if transition is not None:
        m = transition.__dict__["_modules"]
        norms.append(m["norm"])
        convs.append(m["conv"].__dict__["_parameters"]["weight"])
    if len({type(n) for n in norms}) > 1:
        return "the stage mixes SyncBatchNorm and BatchNorm2d"
    if type(norms[0]) is nn.SyncBatchNorm and len({id(n.process_group) for n in norms}) > 1:
        return "the stage's SyncBatchNorms use different process groups"
    norm_tensors = [t for n in norms for d in (n.__dict__,)
                    for t in (d["_parameters"]["weight"], d["_parameters"]["bias"],
                              d["_buffers"]["running_mean"], d["_buffers"]["running_var"])]
    return fusion.tensors_reason(x, convs, norm_tensors)


def _module_reason(x: Tensor, block: Optional[_DenseBlock], transition: Optional[_Transition]) -> Optional[str]:
    channels, growth = x.shape[1], None
    if block is not None:
        for name, layer in block.items():
            reason = fusion.layer_reason(layer, _DenseLayer, f"{block.stage_name}.{name}", channels, growth)
            if reason is not None:
                return reason
            growth = layer.conv2.out_channels
            channels += growth
    if transition is not None:
        return fusion.transition_reason(transition, _Transition, transition.stage_name, channels)
    return None


def _check_stage_input(x: Tensor, block: Optional[_DenseBlock], transition: Optional[_Transition]) -> None:
    """One clear error for an input that the modules would reject too (whichever path runs)."""
    first = next(iter(block.values()), None) if block is not None else None
    norm = getattr(first, "norm1", None) if first is not None else getattr(transition, "norm", None)
    channels = getattr(norm, "num_features", None)
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D input (N, C, H, W), got {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"expected an input with {channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    conv = getattr(first, "conv1", None) if first is not None else getattr(transition, "conv", None)
    # The registered parameter only: reading ``conv.weight`` of a reparametrized conv would run its
    # parametrization (a spectral norm's power iteration) one time more than torchvision does.
    weight = conv._parameters.get("weight") if isinstance(conv, nn.Module) else None
    if isinstance(weight, Tensor):
        if x.dtype != weight.dtype and not (x.is_floating_point() and torch.is_autocast_enabled(x.device.type)):
            raise TypeError(f"expected input dtype {weight.dtype} (the parameters' dtype), got {x.dtype}")
        if x.device != weight.device:
            raise RuntimeError(f"expected input on {weight.device} (the parameters' device), got {x.device}")


@torch.jit.unused
def _run_fused(x: Tensor, block: Optional[_DenseBlock], transition: Optional[_Transition],
               output_escapes: bool = False, quiet: bool = False) -> Optional[Tensor]:
    """The stage's output from the fused node, or None (after ``fusion.fall_back``) where it cannot run.

    ``output_escapes``: the caller hands a block-only stage's output to code that may modify it in
    place; the node keeps that tensor for backward, so the caller gets a copy (torchvision's
    block output is a fresh torch.cat that nothing saves).
    """
    reason = _stage_reason(x, block, transition)
    name = " + ".join(m.stage_name for m in (block, transition) if m is not None)
    if reason is not None:
        if not quiet:
            fusion.fall_back(name, reason)
        return None
    if block is not None:
        stage = block.stage(transition, name)
    else:
        sync, group = _sync_of([], transition, None, transition)
        stage = Stage([], transition, name=name, sync_batchnorm=sync, process_group=group)
    out = dense_stage(x, stage)
    if output_escapes and transition is None and out.requires_grad:
        out = out.clone()
    return out


class _Features(nn.Sequential):
    """torchvision's ``features`` Sequential; a block and the transition after it run as one node
    when neither has hooks of its own (each module's own hooks fire as in torchvision)."""

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            return self._forward_fused(input)
        for module in self:
            input = module(input)
        return input

    @torch.jit.unused
    def _forward_fused(self, x: Tensor) -> Tensor:
        children = list(self._modules.values())
        i = 0
        while i < len(children):
            module = children[i]
            following = children[i + 1] if i + 1 < len(children) else None
            if type(module) is _DenseBlock and not _own_hooks(module):
                if type(following) is _Transition and not _own_hooks(following):
                    out = _run_fused(x, module, following, quiet=True)
                    if out is not None:
                        x, i = out, i + 2
                        continue
                elif _reads_without_modifying(following):
                    # A BatchNorm reads the block's output without modifying it: no copy needed.
                    out = _run_fused(x, module, None, quiet=True)
                    if out is not None:
                        x, i = out, i + 1
                        continue
            x = module(x)
            i += 1
        return x


class DenseNet(nn.Module):
    r"""Densenet-BC model class, torchvision's signature and names, trained in a fraction of the memory.

    Args:
        growth_rate (int): how many filters each layer adds (``k`` in the paper).
        block_config (sequence of ints): how many layers in each dense block (any number of blocks).
        num_init_features (int): filters of the first convolution.
        bn_size (int): bottleneck width factor (``bn_size * k`` channels after conv1).
        drop_rate (float): dropout rate after each dense layer.
        num_classes (int): number of classes.
        memory_efficient (bool): True (default) recomputes each layer's bottleneck in backward from
            the shared feature buffer. False keeps every bottleneck (``bn_size * k`` channels per
            layer) instead, trading memory for one conv1x1 less per layer in backward. Either way
            the concatenated features are never copied per layer.
        small_inputs (bool): the CIFAR stem of the DenseNet papers: ``conv0`` is a 3x3 conv,
            stride 1, padding 1, and there is no ``norm0``/``relu0``/``pool0``.
    """

    def __init__(self, growth_rate: int = 32, block_config: tuple[int, ...] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0.0,
                 num_classes: int = 1000, memory_efficient: bool = True, small_inputs: bool = False) -> None:
        super().__init__()
        for name, value in (("growth_rate", growth_rate), ("num_init_features", num_init_features),
                            ("bn_size", bn_size), ("num_classes", num_classes)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if len(block_config) == 0 or any(int(n) != n or n < 1 for n in block_config):
            raise ValueError(f"block_config must be a non-empty sequence of positive layer counts, "
                             f"got {block_config!r}")
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate!r}")
        self.small_inputs = small_inputs

        if small_inputs:
            stem = [("conv0", nn.Conv2d(3, num_init_features, kernel_size=3, stride=1, padding=1, bias=False))]
        else:
            stem = [
                ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        self.features = _Features(OrderedDict(stem))

        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(int(num_layers), num_features, bn_size, growth_rate, drop_rate, memory_efficient)
            block.stage_name = f"features.denseblock{i + 1}"
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                transition = _Transition(num_features, num_features // 2)
                transition.stage_name = f"features.transition{i + 1}"
                self.features.add_module(f"transition{i + 1}", transition)
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

        # torchvision's initialization.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            self._check_input(x)
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        out = self.classifier(out)
        return out

    @torch.jit.unused
    def _check_input(self, x: Tensor) -> None:
        """One clear error for an input the model cannot take (checked on real tensors only)."""
        if not isinstance(x, Tensor) or isinstance(x, torch.fx.Proxy) or fusion.transforming():
            return
        conv0 = getattr(self.features, "conv0", None)
        in_channels = conv0.in_channels if isinstance(conv0, nn.Conv2d) else None
        if x.dim() != 4 or (in_channels is not None and x.shape[1] != in_channels):
            raise ValueError(f"expected an input of shape (N, {in_channels or 'C'}, H, W), got {tuple(x.shape)}")
        if isinstance(conv0, nn.Conv2d):
            weight = conv0.weight
            if x.dtype != weight.dtype and not (x.is_floating_point() and torch.is_autocast_enabled(x.device.type)):
                raise TypeError(f"expected input dtype {weight.dtype} (the model's dtype), got {x.dtype}")
            if x.device != weight.device:
                raise RuntimeError(f"expected input on {weight.device} (the model's device), got {x.device}")
        if not (self._fits(x.shape[2]) and self._fits(x.shape[3])):
            smallest = self.min_input_size()
            raise ValueError(f"input of {x.shape[2]}x{x.shape[3]} is too small for this DenseNet: its stem and "
                             f"{self.num_transitions()} transitions need H and W of at least {smallest}")

    def num_transitions(self) -> int:
        return sum(isinstance(m, _Transition) for m in self.features)

    def _fits(self, size: int) -> bool:
        """Whether a side of ``size`` pixels gets through the stem and every transition (True where
        the stem has modules whose effect on the size is not known: they report for themselves)."""
        for module in self.features:
            if isinstance(module, _Transition):
                if size < 2:
                    return False
                size //= 2
            elif not isinstance(module, _DenseBlock):
                size = _output_size(module, size)
                if size is None:
                    return True
                if size < 1:
                    return False
        return True

    def min_input_size(self) -> Optional[int]:
        """Smallest H (and W) the model's actual stem and transitions take; None where the stem holds
        modules whose effect on the size is not known."""
        stem = [m for m in self.features if not isinstance(m, (_DenseBlock, _Transition))]
        if any(_output_size(m, 64) is None for m in stem):
            return None
        return next((s for s in range(1, 1 << 16) if self._fits(s)), None)


def _output_size(module: nn.Module, size: int) -> Optional[int]:
    """A side's size after ``module`` (convolution, pooling, or a module that keeps sizes), or None if unknown."""
    if isinstance(module, nn.Sequential) and not isinstance(module, (_Features, _Transition)):
        for child in module:
            size = _output_size(child, size)
            if size is None:
                return None
        return size
    if isinstance(module, (nn.BatchNorm2d, nn.ReLU, nn.Identity, nn.Dropout, nn.SiLU, nn.GELU)):
        return size
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        pair = lambda v: v[0] if isinstance(v, (tuple, list)) else v  # noqa: E731
        kernel, stride, padding = pair(module.kernel_size), pair(module.stride), pair(module.padding)
        if not isinstance(padding, int) or getattr(module, "ceil_mode", False):
            return None
        dilation = pair(getattr(module, "dilation", 1))
        return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    return None
