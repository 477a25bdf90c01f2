"""``convert``: a torchvision DenseNet (any configuration) becomes a densenet_fast one."""
from __future__ import annotations

import copy

from torch import nn

from .models import DenseNet


def _config(module: nn.Module) -> dict:
    features = getattr(module, "features", None)
    classifier = getattr(module, "classifier", None)
    if not isinstance(features, nn.Sequential) or not hasattr(features, "conv0") or not isinstance(classifier, nn.Linear):
        raise TypeError(
            "convert expects a torchvision-style DenseNet (features.conv0, features.denseblockN, classifier), "
            f"got {type(module).__name__}"
        )
    blocks = [features.get_submodule(f"denseblock{i}") for i in range(1, 1000) if hasattr(features, f"denseblock{i}")]
    if not blocks:
        raise TypeError(f"convert found no features.denseblock1 in {type(module).__name__}")
    first = next(iter(blocks[0].children()))
    growth = first.conv2.out_channels
    return dict(
        growth_rate=growth,
        block_config=tuple(len(list(b.children())) for b in blocks),
        num_init_features=features.conv0.out_channels,
        bn_size=first.conv1.out_channels // growth,
        drop_rate=float(getattr(first, "drop_rate", 0.0)),
        num_classes=classifier.out_features,
        small_inputs=features.conv0.kernel_size == (3, 3) and not hasattr(features, "pool0"),
    )


def convert(module: nn.Module, memory_efficient: bool = True) -> DenseNet:
    """The same network as a densenet_fast DenseNet: weights, running stats, BN settings,
    requires_grad, train/eval mode of every module, device and dtype are all kept."""
    fast = DenseNet(memory_efficient=memory_efficient, **_config(module))
    theirs = dict(module.named_modules())
    for name, ours in list(fast.named_modules()):
        if name not in theirs:
            raise TypeError(f"convert: {type(module).__name__} has no module {name!r}; is it a torchvision DenseNet?")
        source = theirs[name]
        if next(ours.children(), None) is None and (list(ours.parameters()) or list(ours.buffers())):
            if type(source) is not type(ours):
                raise TypeError(f"convert: {name!r} is a {type(source).__name__}, expected {type(ours).__name__}")
            # The leaf itself, so BN's eps, momentum, affine and track_running_stats come along.
            fast.set_submodule(name, copy.deepcopy(source))
        else:
            ours.training = source.training
    fast.load_state_dict(module.state_dict(), strict=True)
    return fast
