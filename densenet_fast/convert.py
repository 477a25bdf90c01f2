"""``convert``: a torchvision or timm DenseNet (any configuration) becomes a densenet_fast one."""
from __future__ import annotations

from torch import nn

from .models import DenseNet


def _fail(module: nn.Module, why: str) -> TypeError:
    return TypeError(f"convert expects a torchvision or timm DenseNet with the standard stem, ReLU and average "
                     f"pooling; {type(module).__name__}: {why}")


def _config(module: nn.Module) -> dict:
    features = getattr(module, "features", None)
    classifier = getattr(module, "classifier", None)
    if not isinstance(features, nn.Sequential) or not isinstance(getattr(features, "conv0", None), nn.Conv2d):
        raise _fail(module, "no features.conv0 convolution")
    if not isinstance(classifier, nn.Linear):
        raise _fail(module, f"classifier is a {type(classifier).__name__}, expected Linear")
    # timm's variants that compute something else than torchvision's DenseNet.
    pool_type = getattr(getattr(module, "global_pool", None), "pool_type", "avg")
    if pool_type != "avg":
        raise _fail(module, f"global pooling {pool_type!r}, expected 'avg'")
    head_drop = getattr(module, "head_drop", None)
    if isinstance(head_drop, nn.Dropout) and head_drop.p > 0:
        raise _fail(module, f"dropout {head_drop.p} before the classifier (timm drop_rate), expected none")
    blocks = [getattr(features, f"denseblock{i}") for i in range(1, len(features) + 1)
              if hasattr(features, f"denseblock{i}")]
    if not blocks:
        raise _fail(module, "no features.denseblock1")
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


def _check_same(module: nn.Module, name: str, ours: nn.Module, source: nn.Module) -> None:
    if isinstance(ours, nn.BatchNorm2d):
        if not isinstance(source, nn.modules.batchnorm._BatchNorm):
            raise _fail(module, f"{name} is a {type(source).__name__}, expected a BatchNorm")
        # timm's BatchNormAct2d carries its activation: it must be the ReLU we apply.
        act, drop = getattr(source, "act", nn.ReLU()), getattr(source, "drop", nn.Identity())
        if not isinstance(act, nn.ReLU) or not isinstance(drop, nn.Identity):
            raise _fail(module, f"{name} applies {type(act).__name__}/{type(drop).__name__}, expected ReLU only")
        return
    if type(source) is not type(ours):
        raise _fail(module, f"{name} is a {type(source).__name__}, expected {type(ours).__name__}")
    for attr in ("kernel_size", "stride", "padding", "dilation", "groups", "ceil_mode"):
        if hasattr(ours, attr) and getattr(ours, attr) != getattr(source, attr, None):
            raise _fail(module, f"{name}.{attr} is {getattr(source, attr, None)}, expected {getattr(ours, attr)}")


def _batchnorm_like(source: nn.Module) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(source.num_features, eps=source.eps, momentum=source.momentum, affine=source.affine,
                        track_running_stats=source.track_running_stats)
    bn.training = source.training
    return bn


def convert(module: nn.Module, memory_efficient: bool = True) -> DenseNet:
    """The same network as a densenet_fast DenseNet: weights, running stats, BN settings,
    requires_grad, train/eval mode of every module, device and dtype are all kept."""
    fast = DenseNet(memory_efficient=memory_efficient, **_config(module))
    theirs = dict(module.named_modules())
    for name, ours in list(fast.named_modules()):
        if name not in theirs:
            if isinstance(ours, nn.ReLU):
                continue  # timm applies it inside the BatchNormAct2d before it (checked there)
            raise _fail(module, f"no module {name!r}")
        source = theirs[name]
        if next(ours.children(), None) is not None:  # a container: only its mode carries over
            ours.training = source.training
            continue
        _check_same(module, name, ours, source)
        if isinstance(ours, nn.BatchNorm2d):
            fast.set_submodule(name, _batchnorm_like(source))
        else:
            ours.training = source.training
    fast.load_state_dict(module.state_dict(), strict=True)
    own = dict(fast.named_parameters())
    for name, p in module.named_parameters():
        own[name].requires_grad_(p.requires_grad)
    reference = next(module.parameters())
    return fast.to(device=reference.device, dtype=reference.dtype)
