"""``convert``: a torchvision or timm DenseNet becomes a densenet_fast one, module for module.

Every module of the source is carried to the same position as a deep copy (exact dtype, device,
requires_grad, train/eval mode, settings, hooks and parametrizations of every tensor and module;
tensors shared between modules stay shared; SyncBatchNorm keeps its process group). Only the
containers torchvision's or timm's forward defines (the model, ``features``, dense blocks, dense
layers, transitions) are rebuilt as ours, which run their modules exactly as torchvision does
when a stage cannot run fused. A source that cannot be represented that way is refused with one
TypeError naming the module; nothing is dropped.

timm's DenseNet differs from torchvision's in two places that convert translates: its norms are
BatchNormAct2d (the BatchNorm with its activation inside), which become a BatchNorm2d followed by
the activation in torchvision's relu slot, and its head (global_pool, head_drop), which must be
the plain average pooling our head computes.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from .models import DenseNet, _DenseBlock, _DenseLayer, _Features, _Transition

# Hook tables of nn.Module: a rebuilt container has none, so a source container with any is refused.
_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                "_load_state_dict_post_hooks")


@dataclass(frozen=True)
class _Library:
    """The container classes of one library's DenseNet and the child names their forwards use."""
    name: str
    root: type
    block: type
    layer: type
    transition: type
    root_methods: tuple[str, ...]  # the methods of the model its forward runs
    layer_children: tuple[str, ...]
    transition_children: tuple[str, ...]
    head: tuple[str, ...] = ()  # root children that our fixed ReLU-pool-flatten head stands for
    norm_acts: tuple[type, ...] = ()  # norms that apply their activation themselves
    # Where torchvision has a ReLU module after a norm and such a library does not.
    relu_after: dict = field(default_factory=dict)


def _libraries() -> list[_Library]:
    # A library that was never imported cannot have built the model: nothing is imported here.
    libraries = []
    tv = sys.modules.get("torchvision.models.densenet")
    if tv is not None:
        libraries.append(_Library(
            "torchvision", tv.DenseNet, tv._DenseBlock, tv._DenseLayer, tv._Transition, ("forward",),
            ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2"), ("norm", "relu", "conv", "pool")))
    timm = sys.modules.get("timm.models.densenet")
    norm_act = sys.modules.get("timm.layers.norm_act")
    if timm is not None and norm_act is not None:
        libraries.append(_Library(
            "timm", timm.DenseNet, timm.DenseBlock, timm.DenseLayer, timm.DenseTransition,
            ("forward", "forward_features", "forward_head"), ("norm1", "conv1", "norm2", "conv2"),
            ("norm", "conv", "pool"), head=("global_pool", "head_drop"),
            norm_acts=tuple(getattr(norm_act, n) for n in ("BatchNormAct2d", "SyncBatchNormAct")
                            if hasattr(norm_act, n)),
            relu_after={"norm0": "relu0", "norm1": "relu1", "norm2": "relu2", "norm": "relu"}))
    return libraries


def _refuse(path: str, module: nn.Module, why: str) -> TypeError:
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    return TypeError(f"convert expects a torchvision or timm DenseNet it can carry module by module; "
                     f"{path or 'the model'} ({kind}): {why}")


def _library_of(module: nn.Module) -> _Library:
    for library in _libraries():
        if isinstance(module, library.root):
            changed = [m for m in library.root_methods if getattr(type(module), m) is not getattr(library.root, m)]
            if changed:
                raise _refuse("", module, f"a subclass of {library.name}'s DenseNet with its own {changed[0]}")
            return library
    raise _refuse("", module, "not a torchvision.models.DenseNet or timm.models.densenet.DenseNet")


def _hooks(module: nn.Module) -> list[str]:
    return [table for table in _HOOK_TABLES if getattr(module, table, None)]


def _width(*candidates) -> int:
    """The first positive int among (module, attribute) candidates: sizes for the rebuilt containers,
    read where the standard modules keep them (a carried non-standard module may lack them)."""
    for module, attr in candidates:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 1


def _layer_sizes(layer: nn.Module) -> tuple[int, int, int]:
    """(input channels, growth rate, bn_size) of a source dense layer."""
    norm1, conv1 = getattr(layer, "norm1", None), getattr(layer, "conv1", None)
    norm2, conv2 = getattr(layer, "norm2", None), getattr(layer, "conv2", None)
    inputs = _width((norm1, "num_features"), (conv1, "in_channels"))
    bottleneck = _width((conv1, "out_channels"), (norm2, "num_features"), (conv2, "in_channels"))
    growth = _width((conv2, "out_channels"))
    return inputs, growth, max(1, bottleneck // growth)


class _Converter:
    def __init__(self, library: _Library, source: nn.Module, memory_efficient: bool) -> None:
        self.library = library
        self.memory_efficient = memory_efficient
        # One memo for every copy: tensors and modules shared in the source stay shared in ours, and
        # process groups (which cannot be copied) are the source's own objects.
        self.memo = {}
        for m in source.modules():
            group = getattr(m, "process_group", None)
            if group is not None:
                self.memo[id(group)] = group

    def copy(self, path: str, module):
        try:
            return copy.deepcopy(module, self.memo)
        except Exception as e:  # e.g. a module holding an object that cannot be copied
            raise _refuse(path, module, f"cannot be deep-copied into the converted model ({e})") from e

    def container(self, path: str, source: nn.Module, ours: nn.Module, children: list) -> nn.Module:
        """``ours`` (a rebuilt container) holding ``children`` in order, with ``source``'s mode."""
        if _hooks(source):
            raise _refuse(path, source, f"has hooks ({', '.join(_hooks(source))}) on a container convert "
                                        "rebuilds; remove them and register them on the converted model")
        for name in list(ours._modules):
            delattr(ours, name)
        for name, child in children:
            ours.add_module(name, child)
        ours.training = source.training
        if isinstance(ours, (_DenseBlock, _Transition)):
            ours.stage_name = path  # names the stage in fallback messages, as DenseNet() does
        return ours

    def children(self, path: str, source: nn.Module, required: tuple[str, ...], what: str) -> list:
        """(name, module) pairs of ours for ``source``'s children, in order; timm's norm-activations split."""
        missing = [name for name in required if source._modules.get(name) is None]
        if missing:
            raise _refuse(path, source, f"has no {missing[0]!r}: {self.library.name}'s {what} runs "
                                        f"{', '.join(required)}")
        out = []
        for name, child in source.named_children():
            out += self.norm_and_relu(f"{path}.{name}", name, child)
        return out

    def norm_and_relu(self, path: str, name: str, child: nn.Module) -> list:
        relu_name = self.library.relu_after.get(name)
        if relu_name is None:
            return [(name, self.copy(path, child))]
        if not self.splittable(child):
            # Whatever it computes in timm's norm slot, it computes in ours, with no ReLU after it.
            return [(name, self.copy(path, child)), (relu_name, nn.Identity())]
        act = self.copy(f"{path}.act", child.act)
        if type(child.drop) is not nn.Identity:
            act = nn.Sequential(self.copy(f"{path}.drop", child.drop), act)
        return [(name, self.batchnorm_part(path, child)), (relu_name, act)]

    def splittable(self, norm: nn.Module) -> bool:
        """A timm BatchNormAct2d / SyncBatchNormAct that is exactly a BatchNorm, then drop, then act."""
        return (type(norm) in self.library.norm_acts and not _hooks(norm)
                and not nn.utils.parametrize.is_parametrized(norm)
                and set(norm._modules) == {"drop", "act"})

    def batchnorm_part(self, path: str, norm: nn.Module) -> nn.Module:
        cls = nn.SyncBatchNorm if isinstance(norm, nn.SyncBatchNorm) else nn.BatchNorm2d
        with torch.device("meta"):
            bn = cls(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats)
        if cls is nn.SyncBatchNorm:
            bn.process_group = norm.process_group
        for name, p in norm._parameters.items():
            bn.register_parameter(name, self.copy(f"{path}.{name}", p))
        for name, b in norm._buffers.items():
            bn.register_buffer(name, self.copy(f"{path}.{name}", b),
                               persistent=name not in norm._non_persistent_buffers_set)
        bn.training = norm.training
        return bn

    def layer(self, path: str, source: nn.Module) -> _DenseLayer:
        inputs, growth, bn_size = _layer_sizes(source)
        drop_rate = float(source.drop_rate)
        with torch.device("meta"):
            ours = _DenseLayer(inputs, growth, bn_size, drop_rate, self.memory_efficient)
        ours.drop_rate = drop_rate
        return self.container(path, source, ours,
                              self.children(path, source, self.library.layer_children, "dense layer"))

    def block(self, path: str, source: nn.Module) -> _DenseBlock:
        layers = []
        for name, child in source.named_children():
            if type(child) is not self.library.layer:
                raise _refuse(f"{path}.{name}", child, f"a dense block holds {self.library.name}'s "
                                                       f"{self.library.layer.__name__} layers only")
            layers.append((name, self.layer(f"{path}.{name}", child)))
        inputs, growth, bn_size = _layer_sizes(source._modules[layers[0][0]]) if layers else (1, 1, 1)
        ours = _DenseBlock(0, inputs, bn_size, growth, 0.0, self.memory_efficient)  # its layers: ``layers``
        return self.container(path, source, ours, layers)

    def transition(self, path: str, source: nn.Module) -> _Transition:
        norm, conv = getattr(source, "norm", None), getattr(source, "conv", None)
        with torch.device("meta"):
            ours = _Transition(_width((norm, "num_features"), (conv, "in_channels")), _width((conv, "out_channels")))
        return self.container(path, source, ours,
                              self.children(path, source, self.library.transition_children, "transition"))

    def features(self, source: nn.Module) -> _Features:
        if type(source) is not nn.Sequential:
            raise _refuse("features", source, "expected an nn.Sequential that runs its children in order")
        lib = self.library
        named = list(source.named_children())
        out = []
        for i, (name, child) in enumerate(named):
            path = f"features.{name}"
            if lib.norm_acts and i == len(named) - 1:
                out.append((name, self.final_norm(path, child)))
            elif type(child) is lib.block:
                out.append((name, self.block(path, child)))
            elif type(child) is lib.transition:
                out.append((name, self.transition(path, child)))
            elif isinstance(child, (lib.block, lib.layer, lib.transition)):
                raise _refuse(path, child, f"a subclass of {lib.name}'s dense containers: convert cannot "
                                           "tell what its forward computes")
            else:
                out += self.norm_and_relu(path, name, child)
        return self.container("features", source, _Features(), out)

    def final_norm(self, path: str, norm: nn.Module) -> nn.Module:
        """timm's last norm applies the ReLU that our head (like torchvision's) applies after the features."""
        act, drop = getattr(norm, "act", None), getattr(norm, "drop", None)
        if not (self.splittable(norm) and type(act) is nn.ReLU and not _hooks(act) and type(drop) is nn.Identity):
            applies = "/".join(type(m).__name__ for m in (drop, act) if m is not None) or "no activation"
            raise _refuse(path, norm, f"the last of timm's features applies {applies}, expected ReLU only "
                                      "(a BatchNormAct2d): densenet_fast's head applies ReLU to the features, "
                                      "as torchvision's does")
        return self.batchnorm_part(path, norm)

    def check_head(self, source: nn.Module) -> None:
        """timm's head must compute what our fixed head does: average pooling, flatten, no dropout."""
        pool, drop = source.global_pool, source.head_drop
        for name in self.library.head:
            for sub, m in getattr(source, name).named_modules(prefix=name):
                if _hooks(m):
                    raise _refuse(sub, m, f"has hooks ({', '.join(_hooks(m))}); timm's head becomes "
                                          "densenet_fast's fixed pooling, which has none")
        pool_type = getattr(pool, "pool_type", None)
        if pool_type != "avg":
            raise _refuse("global_pool", pool, f"global pooling {pool_type!r}, expected 'avg'")
        if (type(getattr(pool, "pool", None)) is not nn.AdaptiveAvgPool2d or pool.pool.output_size not in (1, (1, 1))
                or type(getattr(pool, "flatten", None)) is not nn.Flatten or pool.flatten.start_dim != 1):
            raise _refuse("global_pool", pool, "expected adaptive average pooling to 1x1, then flatten")
        if not (type(drop) is nn.Identity or (type(drop) is nn.Dropout and drop.p == 0)):
            raise _refuse("head_drop", drop, f"dropout {getattr(drop, 'p', drop)} before the classifier "
                                             "(timm drop_rate), expected none")

    def model(self, source: nn.Module) -> DenseNet:
        lib = self.library
        if _hooks(source):
            raise _refuse("", source, f"has hooks ({', '.join(_hooks(source))}); remove them and register "
                                      "them on the converted model")
        for name in ("features", "classifier") + lib.head:
            if source._modules.get(name) is None:
                raise _refuse("", source, f"has no {name!r}")
        if lib.head:
            self.check_head(source)
        features = self.features(source.features)
        blocks = [m for m in source.features.children() if type(m) is lib.block]
        if not blocks or len(blocks[0]) == 0:
            raise _refuse("features", source.features, f"holds no {lib.name} dense block with layers")
        first = next(iter(blocks[0].children()))
        inputs, growth, bn_size = _layer_sizes(first)
        conv0 = source.features._modules.get("conv0")
        small_inputs = (isinstance(conv0, nn.Conv2d) and conv0.kernel_size == (3, 3) and conv0.stride == (1, 1)
                        and "pool0" not in source.features._modules)
        with torch.device("meta"):
            ours = DenseNet(growth, tuple(len(b) for b in blocks), inputs, bn_size, float(first.drop_rate),
                            num_classes=_width((source.classifier, "out_features")),
                            memory_efficient=self.memory_efficient, small_inputs=small_inputs)
        ours.features = features
        ours.classifier = self.copy("classifier", source.classifier)
        for name, child in source.named_children():
            if name not in ("features", "classifier") + lib.head:  # run by neither forward, but kept
                ours.add_module(name, self.copy(name, child))
        ours.training = source.training
        return ours


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return (list(module.named_parameters(remove_duplicate=False))
            + list(module.named_buffers(remove_duplicate=False)))


def _check_carried(source: nn.Module, ours: nn.Module) -> None:
    """Every tensor of the source is in ours under its name, and nothing else is: a safety net."""
    theirs, mine = dict(_tensors(source)), dict(_tensors(ours))
    lost, invented = sorted(theirs.keys() - mine.keys()), sorted(mine.keys() - theirs.keys())
    if lost or invented or list(source.state_dict()) != list(ours.state_dict()):
        raise RuntimeError(f"convert built a model whose tensors differ from the source's (a bug in "
                           f"densenet_fast.convert): lost {lost[:5]}, invented {invented[:5]}")
    for name, t in mine.items():
        if t.is_meta and not theirs[name].is_meta:
            raise RuntimeError(f"convert left {name} uninitialized (a bug in densenet_fast.convert)")


def convert(module: nn.Module, memory_efficient: bool = True) -> DenseNet:
    """The same network as a densenet_fast DenseNet, module for module.

    ``module`` is a torchvision or timm DenseNet, in any configuration and with any modules in
    place of the standard ones (another activation, FrozenBatchNorm2d, a conv with bias, a
    max-pooling transition, modules added to ``features``...). Each is carried as a deep copy to
    the same position: weights, running stats, per-tensor dtype and device, requires_grad, BN
    settings, SyncBatchNorm and its process group, and the train/eval mode of every module are
    kept. Stages holding only the standard modules run fused; the others run their modules as
    torchvision does. Raises TypeError, naming the module, for a model that cannot be carried.
    """
    converter = _Converter(_library_of(module), module, memory_efficient)
    ours = converter.model(module)
    _check_carried(module, ours)
    return ours
