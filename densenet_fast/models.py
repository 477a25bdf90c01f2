"""Drop-in DenseNets: torchvision's modules, names and signatures, with the block algorithm inside.

Parameter and buffer names are torchvision's (``features.denseblock1.denselayer1.norm1.weight``,
``features.transition1.conv.weight``, ``classifier.weight``...), so state_dicts load both ways.
The math of blocks and transitions lives in ``densenet_fast.block_algorithm`` (run as one op by
``densenet_fast.block``); the modules here only hold parameters and say which form one node.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .block import Stage, dense_stage

# Old torchvision checkpoints name a layer's modules 'norm.1', 'conv.2', ...
_LEGACY_LAYER_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


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

    def forward(self, input: Tensor | list[Tensor]) -> Tensor:
        """The layer's new features, from its input or the list of earlier features (torchvision's API)."""
        prev = torch.cat(input, 1) if isinstance(input, (list, tuple)) else input
        features = dense_stage(prev, Stage([self], None, self.memory_efficient))
        # A copy of the k new channels: a view would keep the whole one-layer buffer alive.
        return features[:, prev.shape[1]:].clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            legacy = _LEGACY_LAYER_KEY.match(key)
            if legacy:
                state_dict[legacy.group(1) + legacy.group(2)] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _DenseBlock(nn.ModuleDict):
    _version = 2
    # Set by densenet_fast.convert_sync_batchnorm.
    sync_batchnorm = False
    process_group = None

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float, memory_efficient: bool = True) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate, memory_efficient)
            self.add_module("denselayer%d" % (i + 1), layer)

    def stage(self, transition: Optional["_Transition"] = None, name: str = "dense block") -> Stage:
        layers = list(self.values())
        sync = self.sync_batchnorm or (transition is not None and transition.sync_batchnorm)
        return Stage(layers, transition, all(layer.memory_efficient for layer in layers), name, sync,
                     self.process_group if self.sync_batchnorm else getattr(transition, "process_group", None))

    def forward(self, init_features: Tensor) -> Tensor:
        """All features of the block, N x (C0 + L*k) x H x W, as torchvision's block returns them."""
        return dense_stage(init_features, self.stage())


class _Transition(nn.Sequential):
    sync_batchnorm = False
    process_group = None

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return dense_stage(x, Stage([], self, sync_batchnorm=self.sync_batchnorm, process_group=self.process_group))


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


class _Features(nn.Sequential):
    """torchvision's ``features`` Sequential; a block and the transition after it run as one node
    (separately when either has hooks, so forward hooks see every module as in torchvision)."""

    def forward(self, x: Tensor) -> Tensor:
        named = list(self.named_children())
        i = 0
        while i < len(named):
            name, module = named[i]
            following = named[i + 1] if i + 1 < len(named) else (None, None)
            fuse = isinstance(following[1], _Transition) and not (_has_hooks(module) or _has_hooks(following[1]))
            if isinstance(module, _DenseBlock) and fuse:
                x = dense_stage(x, module.stage(following[1], f"features.{name} + features.{following[0]}"))
                i += 2
            elif isinstance(module, _DenseBlock) and not _has_hooks(module):
                x = dense_stage(x, module.stage(name=f"features.{name}"))
                i += 1
            else:
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
            raise ValueError(f"block_config must be a non-empty sequence of positive layer counts, got {block_config!r}")
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
            self.features.add_module("denseblock%d" % (i + 1), block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module("transition%d" % (i + 1), _Transition(num_features, num_features // 2))
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
        in_channels = self.features.conv0.in_channels
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != in_channels:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected an input of shape (N, {in_channels}, H, W), got {got}")
        weight = self.features.conv0.weight
        if x.dtype != weight.dtype and not (x.is_floating_point() and torch.is_autocast_enabled(x.device.type)):
            raise TypeError(f"expected input dtype {weight.dtype} (the model's dtype), got {x.dtype}")
        if x.device != weight.device:
            raise RuntimeError(f"expected input on {weight.device} (the model's device), got {x.device}")
        smallest = self.min_input_size()
        if x.shape[2] < smallest or x.shape[3] < smallest:
            raise ValueError(f"input of {x.shape[2]}x{x.shape[3]} is too small for this DenseNet: its stem and "
                             f"{self.num_transitions()} transitions need H and W of at least {smallest}")
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


    def num_transitions(self) -> int:
        return sum(isinstance(m, _Transition) for m in self.features)

    def min_input_size(self) -> int:
        """Smallest H (and W) for which every transition gets at least 2x2 to pool."""
        def fits(size: int) -> bool:
            if not self.small_inputs:
                size = (size - 1) // 2 + 1  # conv0: 7x7, stride 2, padding 3
                size = (size - 1) // 2 + 1  # pool0: 3x3, stride 2, padding 1
            for _ in range(self.num_transitions()):
                if size < 2:
                    return False
                size //= 2
            return size >= 1

        return next(s for s in range(1, 1 << 16) if fits(s))


def _densenet(growth_rate: int, block_config: tuple[int, ...], num_init_features: int, weights_enum: Any,
              weights: Any, progress: bool, **kwargs: Any) -> DenseNet:
    if weights is not None:
        from torchvision.models import densenet as tv_densenet
        from torchvision.models._utils import _ovewrite_named_param

        try:
            weights = weights_enum.verify(weights)
        except KeyError:
            raise ValueError(f"unknown weights {weights!r}; expected one of "
                             f"{[str(w) for w in weights_enum]} or None") from None
        _ovewrite_named_param(kwargs, "num_classes", len(weights.meta["categories"]))
    model = DenseNet(growth_rate, block_config, num_init_features, **kwargs)
    if weights is not None:
        # torchvision's own download, cache, hash check and legacy-key remapping.
        tv_densenet._load_state_dict(model, weights, progress)
    return model


def _tv_weights(name: str):
    import torchvision.models as tvm

    return getattr(tvm, name)


def densenet121(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-121 (k=32, blocks 6-12-24-16); ``weights`` takes torchvision's DenseNet121_Weights."""
    return _densenet(32, (6, 12, 24, 16), 64, _tv_weights("DenseNet121_Weights"), weights, progress, **kwargs)


def densenet161(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-161 (k=48, blocks 6-12-36-24); ``weights`` takes torchvision's DenseNet161_Weights."""
    return _densenet(48, (6, 12, 36, 24), 96, _tv_weights("DenseNet161_Weights"), weights, progress, **kwargs)


def densenet169(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-169 (k=32, blocks 6-12-32-32); ``weights`` takes torchvision's DenseNet169_Weights."""
    return _densenet(32, (6, 12, 32, 32), 64, _tv_weights("DenseNet169_Weights"), weights, progress, **kwargs)


def densenet201(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-201 (k=32, blocks 6-12-48-32); ``weights`` takes torchvision's DenseNet201_Weights."""
    return _densenet(32, (6, 12, 48, 32), 64, _tv_weights("DenseNet201_Weights"), weights, progress, **kwargs)


def densenet264(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-264 (k=32, blocks 6-12-64-48). No pretrained weights exist for it."""
    if weights is not None:
        raise ValueError(f"densenet264 has no pretrained weights; expected weights=None, got {weights!r}")
    return DenseNet(32, (6, 12, 64, 48), 64, **kwargs)


def densenet_bc(depth: int = 100, growth_rate: int = 12, num_classes: int = 10, small_inputs: bool = True,
                **kwargs: Any) -> DenseNet:
    """DenseNet-BC of the paper's CIFAR experiments: 3 blocks of (depth - 4) / 6 bottleneck layers,
    compression 0.5, 2k initial features."""
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(
            f"DenseNet-BC depth must be 6n + 4 with n >= 1 (e.g. 100, 190, 250), got {depth!r}"
        )
    layers = (depth - 4) // 6
    return DenseNet(growth_rate, (layers, layers, layers), 2 * growth_rate, num_classes=num_classes,
                    small_inputs=small_inputs, **kwargs)
