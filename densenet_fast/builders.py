"""torchvision's DenseNet builders, building densenet_fast models.

``densenet121(weights=...)`` and its siblings follow torchvision's conventions exactly: ``weights``
takes torchvision's enum (a member, its name, or None) and is annotated with it, so
``torchvision.models.get_model_weights(densenet_fast.densenet121)`` finds it; the legacy
``pretrained=True/False`` works through torchvision's own ``handle_legacy_interface`` with its
warnings; weights download through torchvision's ``_load_state_dict`` (cache, hash check, legacy
key remapping).

This module imports torchvision (about 2 s) for those enums. ``densenet_fast`` loads it only on the
first access to a builder, so ``import densenet_fast`` stays as fast as torch's import; models.py
never imports it.
"""
# No ``from __future__ import annotations`` here: get_model_weights reads the annotations as objects.
from typing import Any, Optional

from torchvision.models import densenet as tv_densenet
from torchvision.models._api import WeightsEnum
from torchvision.models._utils import _ovewrite_named_param, handle_legacy_interface
from torchvision.models.densenet import (
    DenseNet121_Weights,
    DenseNet161_Weights,
    DenseNet169_Weights,
    DenseNet201_Weights,
)

from .models import DenseNet

__all__ = ["densenet121", "densenet161", "densenet169", "densenet201", "densenet264", "densenet_bc",
           "DenseNet264_Weights", "DenseNetBC_Weights"]


class DenseNet264_Weights(WeightsEnum):
    """No pretrained weights exist for DenseNet-264: ``get_model_weights(densenet264)`` gives this
    empty enum, as it gives every torchvision builder its enum, and it lists none."""


class DenseNetBC_Weights(WeightsEnum):
    """No pretrained weights exist for the CIFAR DenseNet-BC models: an empty enum (see DenseNet264_Weights)."""


def _verify(builder: str, weights_enum: type[WeightsEnum], weights: Any) -> Optional[WeightsEnum]:
    """torchvision's check of ``weights`` (a member, its name or None), with a ValueError naming the choices."""
    if weights is not None and len(weights_enum.__members__) == 0:
        raise ValueError(f"{builder} has no pretrained weights; expected weights=None, got {weights!r}")
    try:
        return weights_enum.verify(weights)
    except KeyError:
        raise ValueError(f"unknown weights {weights!r} for {builder}; expected a {weights_enum.__name__}, the name "
                         f"of one ({', '.join(weights_enum.__members__)}), or None") from None


def _densenet(builder: str, growth_rate: int, block_config: tuple[int, ...], num_init_features: int,
              weights_enum: type[WeightsEnum], weights: Any, progress: bool, **kwargs: Any) -> DenseNet:
    weights = _verify(builder, weights_enum, weights)
    if weights is not None:
        _ovewrite_named_param(kwargs, "num_classes", len(weights.meta["categories"]))
    model = DenseNet(growth_rate, block_config, num_init_features, **kwargs)
    if weights is not None:
        # torchvision's own download, cache, hash check and legacy-key remapping.
        tv_densenet._load_state_dict(model, weights, progress)
    return model


@handle_legacy_interface(weights=("pretrained", DenseNet121_Weights.IMAGENET1K_V1))
def densenet121(*, weights: Optional[DenseNet121_Weights] = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-121 (k=32, blocks 6-12-24-16); ``weights`` takes torchvision's DenseNet121_Weights.

    Args:
        weights (DenseNet121_Weights, its name, or None): pretrained weights (torchvision's), or none.
        progress (bool): show a progress bar while downloading the weights.
        **kwargs: passed to :class:`densenet_fast.DenseNet` (``memory_efficient``, ``num_classes``...).
    """
    return _densenet("densenet121", 32, (6, 12, 24, 16), 64, DenseNet121_Weights, weights, progress, **kwargs)


@handle_legacy_interface(weights=("pretrained", DenseNet161_Weights.IMAGENET1K_V1))
def densenet161(*, weights: Optional[DenseNet161_Weights] = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-161 (k=48, blocks 6-12-36-24); ``weights`` takes torchvision's DenseNet161_Weights.
    Arguments as for :func:`densenet121`."""
    return _densenet("densenet161", 48, (6, 12, 36, 24), 96, DenseNet161_Weights, weights, progress, **kwargs)


@handle_legacy_interface(weights=("pretrained", DenseNet169_Weights.IMAGENET1K_V1))
def densenet169(*, weights: Optional[DenseNet169_Weights] = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-169 (k=32, blocks 6-12-32-32); ``weights`` takes torchvision's DenseNet169_Weights.
    Arguments as for :func:`densenet121`."""
    return _densenet("densenet169", 32, (6, 12, 32, 32), 64, DenseNet169_Weights, weights, progress, **kwargs)


@handle_legacy_interface(weights=("pretrained", DenseNet201_Weights.IMAGENET1K_V1))
def densenet201(*, weights: Optional[DenseNet201_Weights] = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-201 (k=32, blocks 6-12-48-32); ``weights`` takes torchvision's DenseNet201_Weights.
    Arguments as for :func:`densenet121`."""
    return _densenet("densenet201", 32, (6, 12, 48, 32), 64, DenseNet201_Weights, weights, progress, **kwargs)


# pretrained=True raises torchvision's "No weights available for model densenet264".
@handle_legacy_interface(weights=("pretrained", None))
def densenet264(*, weights: Optional[DenseNet264_Weights] = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-264 (k=32, blocks 6-12-64-48). No pretrained weights exist for it."""
    return _densenet("densenet264", 32, (6, 12, 64, 48), 64, DenseNet264_Weights, weights, progress, **kwargs)


def bc_layers_per_block(depth: int) -> int:
    """The layers per block of DenseNet-BC of ``depth``, (depth - 4) / 6; ValueError unless depth is 6n + 4."""
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f"DenseNet-BC depth must be 6n + 4 with n >= 1 (e.g. 100, 190, 250), got {depth!r}")
    return (depth - 4) // 6


@handle_legacy_interface(weights=("pretrained", None))
def densenet_bc(depth: int = 100, growth_rate: int = 12, num_classes: int = 10, small_inputs: bool = True, *,
                weights: Optional[DenseNetBC_Weights] = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-BC of the paper's CIFAR experiments: 3 blocks of (depth - 4) / 6 bottleneck layers,
    compression 0.5, 2k initial features. No pretrained weights exist for it."""
    _verify("densenet_bc", DenseNetBC_Weights, weights)
    layers = bc_layers_per_block(depth)
    return DenseNet(growth_rate, (layers, layers, layers), 2 * growth_rate, num_classes=num_classes,
                    small_inputs=small_inputs, **kwargs)
