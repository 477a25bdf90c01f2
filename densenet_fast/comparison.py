"""The models a benchmark compares, built in one place: torchvision's DenseNet (the baseline), the
same with ``memory_efficient=True``, optionally torch.compile'd torchvision, and densenet_fast pinned
to each backend, all with the baseline's weights.

``densenet-fast bench`` and ``max-depth``, ``tools/gpu_check.py`` and ``benchmarks/core_benchmark.py``
build their models here. This module imports the models (``convert``) and the backend registry; no
model module imports it.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

MODEL_NAMES = ("densenet121", "densenet161", "densenet169", "densenet201", "densenet264")
BASELINE = "torchvision"
MEMORY_EFFICIENT = "torchvision memory_efficient"
COMPILED = "torchvision compiled"


def fast_name(backend: str) -> str:
    """The comparison's name of densenet_fast pinned to ``backend``."""
    return f"densenet_fast[{backend}]"


def torchvision_densenet_bc(depth: int, growth_rate: int = 12, num_classes: int = 10,
                            memory_efficient: bool = False) -> nn.Module:
    """torchvision's DenseNet in the DenseNet-BC CIFAR configuration (3x3 stem, no pooling stem)."""
    import torchvision

    from .builders import bc_layers_per_block

    n = bc_layers_per_block(depth)
    model = torchvision.models.DenseNet(growth_rate, (n, n, n), 2 * growth_rate, num_classes=num_classes,
                                        memory_efficient=memory_efficient)
    model.features.conv0 = nn.Conv2d(3, 2 * growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
    for name in ("norm0", "relu0", "pool0"):
        delattr(model.features, name)
    return model


def torchvision_model(model: Optional[str], depth: Optional[int], growth_rate: int = 12,
                      memory_efficient: bool = False) -> nn.Module:
    """torchvision's ``model`` (a name from MODEL_NAMES), or its DenseNet-BC of ``depth`` when no name is given."""
    import torchvision

    if model is None:
        return torchvision_densenet_bc(depth, growth_rate, memory_efficient=memory_efficient)
    if model == "densenet264":  # torchvision has no builder for it; the same config as densenet_fast's
        return torchvision.models.DenseNet(32, (6, 12, 64, 48), 64, memory_efficient=memory_efficient)
    if model not in MODEL_NAMES:
        raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODEL_NAMES)}")
    return getattr(torchvision.models, model)(memory_efficient=memory_efficient)


def last_block_side(model: Optional[str], side: int) -> int:
    """The image side the last dense block sees: a DenseNet-BC (stride-1 stem) halves it in each of its 2
    transitions (2x2 average pooling); the ImageNet models first run a 7x7 stride-2 conv and a 3x3
    stride-2 max pool (both padded), then 3 transitions."""
    if model is None:
        return side // 4
    side = (side - 1) // 2 + 1
    side = (side - 1) // 2 + 1
    return side // 8


def min_image_size(model: Optional[str], batch: int = 2) -> int:
    """The smallest image side a training step of ``batch`` images runs at: the last block needs a pixel,
    and its batch norms more than one value per channel (batch x side^2 > 1). Batch 2 or more: 4 for a
    DenseNet-BC, 29 for the ImageNet models (torchvision's ``min_size`` for their weights)."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    side = 1
    while last_block_side(model, side) < 1 or batch * last_block_side(model, side) ** 2 < 2:
        side += 1
    return side


class Pinned(nn.Module):
    """Runs ``model``'s forward with ``backend`` pinned; backward reuses the backend the forward chose."""

    def __init__(self, model: nn.Module, backend: str):
        super().__init__()
        self.model, self.backend = model, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .ops import use_backend

        with use_backend(self.backend):
            return self.model(x)


def backends_for(x: torch.Tensor, autocast_dtype: Optional[torch.dtype] = None) -> list[str]:
    """The densenet_fast backends available here that serve tensors like ``x`` (its device; its
    dtype, or under autocast ``autocast_dtype``): every one the registry lists for the device
    (``serving_backends``) that ``supports`` them, so a new backend joins the comparison without a
    change here."""
    from .ops import backend_named, serving_backends

    probe = x if autocast_dtype is None else torch.empty(2, 1, 1, 1, device=x.device, dtype=autocast_dtype)
    return [name for name in serving_backends(x.device.type) if backend_named(name).supports(probe) is None]


def comparison_models(model: Optional[str], depth: Optional[int], backends: list[str], growth_rate: int = 12,
                      compile: bool = False, device: Optional[torch.device] = None,
                      dtype: Optional[torch.dtype] = None,
                      memory_format: Optional[torch.memory_format] = None) -> dict[str, nn.Module]:
    """The comparison set, by name: torchvision's ``model`` (a name from MODEL_NAMES) or DenseNet-BC of
    ``depth`` and ``growth_rate`` (BASELINE, first), the same with memory_efficient=True
    (MEMORY_EFFICIENT), optionally torch.compile'd torchvision (COMPILED), then densenet_fast pinned to
    each of ``backends`` (``fast_name(backend)``); all with the baseline's (random) weights, moved to
    ``device``, ``dtype`` and ``memory_format`` where given."""
    from .convert import convert

    tv = torchvision_model(model, depth, growth_rate)
    models: dict[str, nn.Module] = {BASELINE: tv}
    tv_me = torchvision_model(model, depth, growth_rate, memory_efficient=True)
    tv_me.load_state_dict(tv.state_dict())
    models[MEMORY_EFFICIENT] = tv_me
    if compile:
        models[COMPILED] = torch.compile(copy.deepcopy(tv))
    for backend in backends:
        models[fast_name(backend)] = Pinned(convert(tv), backend)
    to = {k: v for k, v in (("device", device), ("dtype", dtype), ("memory_format", memory_format)) if v is not None}
    return {name: m.to(**to) for name, m in models.items()} if to else models
