"""Drop-in compatibility with torchvision: names, state_dicts both ways, numbers, convert()."""

import pytest
import torch
import torchvision

import densenet_fast
from densenet_fast.comparison import torchvision_densenet_bc
from helpers import compare_with_reference

PRESETS = ["densenet121", "densenet161", "densenet169", "densenet201"]


@pytest.mark.parametrize("name", PRESETS)
def test_state_dict_loads_strictly_both_ways(name):
    tv = getattr(torchvision.models, name)()
    fast = getattr(densenet_fast, name)()
    assert list(fast.state_dict()) == list(tv.state_dict())
    fast.load_state_dict(tv.state_dict(), strict=True)
    tv.load_state_dict(fast.state_dict(), strict=True)
    for (key, a), b in zip(fast.state_dict().items(), tv.state_dict().values()):
        assert a.shape == b.shape and torch.equal(a, b), key


def test_densenet264_and_densenet_bc_shapes():
    model = densenet_fast.densenet264()
    assert [len(getattr(model.features, f"denseblock{i}")) for i in range(1, 5)] == [6, 12, 64, 48]
    assert model.classifier.in_features == 2688
    bc = densenet_fast.densenet_bc(depth=100)
    assert [len(getattr(bc.features, f"denseblock{i}")) for i in range(1, 4)] == [16, 16, 16]
    assert bc.features.conv0.kernel_size == (3, 3) and bc.features.conv0.out_channels == 24
    assert not hasattr(bc.features, "pool0") and bc.classifier.out_features == 10
    # The paper's largest CIFAR model: depth 190, k=40, 31 layers a block -> 2190 final features.
    assert densenet_fast.densenet_bc(190, 40).classifier.in_features == 2190


@pytest.mark.parametrize("depth", [99, 7, 100.0])
def test_densenet_bc_rejects_depths_that_do_not_fit(depth):
    with pytest.raises(ValueError, match="6n \\+ 4"):
        densenet_fast.densenet_bc(depth=depth)


def test_legacy_state_dict_keys_are_remapped():
    fast = densenet_fast.DenseNet(8, (2, 2), 16, num_classes=5)
    legacy = {}
    for key, value in fast.state_dict().items():
        if "denselayer" in key and key.endswith("num_batches_tracked"):
            continue  # checkpoints of that era predate num_batches_tracked
        for old, new in (("norm1", "norm.1"), ("conv2", "conv.2"), ("norm2", "norm.2"), ("conv1", "conv.1")):
            if "denselayer" in key and f".{old}." in key:
                key = key.replace(f".{old}.", f".{new}.")
        legacy[key] = value.clone()
    assert any(".norm.1." in k for k in legacy)
    other = densenet_fast.DenseNet(8, (2, 2), 16, num_classes=5)
    other.load_state_dict(legacy, strict=True)
    for (key, a), b in zip(other.state_dict().items(), fast.state_dict().values()):
        assert torch.equal(a, b), key


def test_matches_torchvision_outputs_and_grads():
    torch.manual_seed(0)
    tv = torchvision.models.DenseNet(8, (2, 3, 2), 16, num_classes=6).double()
    fast = densenet_fast.convert(tv)
    compare_with_reference(fast, tv, torch.randn(2, 3, 40, 36, dtype=torch.double))


def test_convert_keeps_weights_modes_settings_dtype():
    torch.manual_seed(0)
    tv = torchvision.models.DenseNet(6, (2, 2), 12, bn_size=3, drop_rate=0.2, num_classes=4)
    tv.features.denseblock1.denselayer1.norm1.eval()
    tv.features.transition1.norm.momentum = None
    tv.features.norm5.eps = 1e-3
    tv.features.conv0.weight.requires_grad_(False)
    tv = tv.double()
    fast = densenet_fast.convert(tv)
    assert isinstance(fast, densenet_fast.DenseNet)
    assert fast.features.conv0.weight.dtype == torch.float64 and not fast.features.conv0.weight.requires_grad
    assert fast.features.denseblock1.denselayer1.drop_rate == 0.2
    assert not fast.features.denseblock1.denselayer1.norm1.training and fast.features.denseblock1.training
    assert fast.features.transition1.norm.momentum is None and fast.features.norm5.eps == 1e-3
    for (key, a), b in zip(fast.state_dict().items(), tv.state_dict().values()):
        assert torch.equal(a, b), key
    tv.eval()
    assert not densenet_fast.convert(tv).training


def test_convert_cifar_stem_and_rejects_other_modules():
    tv = torchvision_densenet_bc(16, growth_rate=4)
    fast = densenet_fast.convert(tv)
    assert fast.small_inputs and fast.features.conv0.stride == (1, 1)
    with pytest.raises(TypeError, match="convert expects a torchvision or timm DenseNet"):
        densenet_fast.convert(torchvision.models.resnet18())


def test_torchvision_weights_enum_is_accepted_without_download():
    weights = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1
    with pytest.raises(ValueError, match="num_classes"):
        # torchvision's own check runs before any download is attempted.
        densenet_fast.densenet121(weights=weights, num_classes=10)
    with pytest.raises(ValueError):
        densenet_fast.densenet121(weights="NOT_A_WEIGHT")
