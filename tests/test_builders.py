"""The builders follow torchvision's conventions: weights enums, the legacy pretrained interface and its
warnings, torchvision's loader; and importing the package does not import torchvision. Nothing downloads:
torchvision's loader is served a state_dict saved in tmp_path, or replaced by a recorder."""
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torchvision
from torchvision.models import get_model_weights

from densenet_fast import builders
from helpers import randomize_bn

WEIGHTS = {
    "densenet121": torchvision.models.DenseNet121_Weights,
    "densenet161": torchvision.models.DenseNet161_Weights,
    "densenet169": torchvision.models.DenseNet169_Weights,
    "densenet201": torchvision.models.DenseNet201_Weights,
}


def _messages(build):
    """What ``build()`` returns and the messages of the warnings it gives, every one recorded."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build()
    return model, [str(w.message) for w in caught]


@pytest.fixture
def loads(monkeypatch):
    """Replaces torchvision's _load_state_dict (ours and torchvision's builders both call it) by a
    recorder of the weights asked for: the builders run, on the meta device, without a download."""
    calls = []
    monkeypatch.setattr(torchvision.models.densenet, "_load_state_dict",
                        lambda model, weights, progress: calls.append((weights, progress)))
    return calls


def _on_meta(build):
    with torch.device("meta"):
        return build()


@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_get_model_weights_finds_torchvisions_enum(name):
    assert get_model_weights(getattr(builders, name)) is WEIGHTS[name]


@pytest.mark.parametrize("name, enum", [("densenet264", builders.DenseNet264_Weights),
                                        ("densenet_bc", builders.DenseNetBC_Weights)])
def test_builders_without_weights_have_an_empty_enum(name, enum):
    builder = getattr(builders, name)
    assert get_model_weights(builder) is enum and list(enum) == []
    with pytest.raises(ValueError, match=f"No weights available for model {name}"):
        builder(pretrained=True)  # torchvision's own message
    with pytest.raises(ValueError, match=f"{name} has no pretrained weights; expected weights=None"):
        builder(weights="IMAGENET1K_V1")
    model, messages = _messages(lambda: _on_meta(lambda: builder(pretrained=False)))
    assert isinstance(model, builders.DenseNet) and any("'pretrained' is deprecated" in m for m in messages)


@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_enum_meta_describes_our_model(name):
    meta = WEIGHTS[name].IMAGENET1K_V1.meta
    model = _on_meta(getattr(builders, name))
    assert sum(p.numel() for p in model.parameters()) == meta["num_params"]
    assert model.classifier.out_features == len(meta["categories"])


@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_min_size_of_the_enum_meta_runs(name):
    torch.manual_seed(0)
    model = getattr(builders, name)().eval()
    x = torch.randn(1, 3, *WEIGHTS[name].IMAGENET1K_V1.meta["min_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(WEIGHTS))
@pytest.mark.parametrize("call", ["pretrained=True", "pretrained=False", "positional True", "positional False"])
def test_legacy_pretrained_interface_is_torchvisions(name, call, loads):
    kwargs, args = {}, ()
    if call.startswith("pretrained"):
        kwargs["pretrained"] = call.endswith("True")
    else:
        args = (call.endswith("True"),)
    ours, our_warnings = _messages(lambda: _on_meta(lambda: getattr(builders, name)(*args, **kwargs)))
    ours_loaded = list(loads)
    loads.clear()
    _, their_warnings = _messages(lambda: _on_meta(lambda: getattr(torchvision.models, name)(*args, **kwargs)))
    assert isinstance(ours, builders.DenseNet)
    assert our_warnings == their_warnings and our_warnings
    assert ours_loaded == loads
    assert ours_loaded == ([(WEIGHTS[name].IMAGENET1K_V1, True)] if call.endswith("True") else [])


def _legacy_keys(state_dict):
    """The checkpoint's names of torchvision's published files: 'norm.1', 'conv.2'... inside dense layers."""
    return {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", key): value
            for key, value in state_dict.items() if not (".denselayer" in key and "num_batches_tracked" in key)}


def test_pretrained_weights_load_through_torchvisions_loader(tmp_path, monkeypatch):
    torch.manual_seed(0)
    published = randomize_bn(torchvision.models.densenet121())
    path = tmp_path / "densenet121.pth"
    torch.save(_legacy_keys(published.state_dict()), path)
    assert any(".norm.1." in key for key in torch.load(path))
    requests = []

    def serve(url, *args, **kwargs):
        requests.append((url, kwargs))
        return torch.load(path)

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", serve)
    ours, our_warnings = _messages(lambda: builders.densenet121(pretrained=True))
    theirs, their_warnings = _messages(lambda: torchvision.models.densenet121(pretrained=True))
    assert our_warnings == their_warnings
    url = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1.url
    assert requests == [(url, dict(progress=True, check_hash=True))] * 2
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (key, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), key
    loaded = published.state_dict()
    for key, value in ours.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, loaded[key]), key


@pytest.mark.parametrize("weights", ["enum", "IMAGENET1K_V1", "DenseNet121_Weights.IMAGENET1K_V1", "DEFAULT", None])
def test_weights_take_the_enum_its_names_and_none(weights, loads):
    enum = torchvision.models.DenseNet121_Weights
    _on_meta(lambda: builders.densenet121(weights=enum.IMAGENET1K_V1 if weights == "enum" else weights,
                                          progress=False))
    assert loads == ([] if weights is None else [(enum.IMAGENET1K_V1, False)])


def test_wrong_weights_are_refused():
    with pytest.raises(ValueError, match=r"unknown weights 'NOT_A_WEIGHT' for densenet169; expected a "
                                         r"DenseNet169_Weights, the name of one \(IMAGENET1K_V1, DEFAULT\), or None"):
        builders.densenet169(weights="NOT_A_WEIGHT")
    with pytest.raises(TypeError, match="expected DenseNet121_Weights but received DenseNet161_Weights"):
        builders.densenet121(weights=torchvision.models.DenseNet161_Weights.IMAGENET1K_V1)


def test_num_classes_follows_torchvisions_rules(loads):
    weights = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1
    assert _on_meta(lambda: builders.densenet121(num_classes=10)).classifier.out_features == 10
    assert _on_meta(lambda: builders.densenet121(weights=weights, num_classes=1000)).classifier.out_features == 1000
    assert loads == [(weights, True)]
    with pytest.raises(ValueError, match="The parameter 'num_classes' expected value 1000 but got 10 instead"):
        builders.densenet121(weights=weights, num_classes=10)
    assert _on_meta(lambda: builders.densenet_bc(40, num_classes=100)).classifier.out_features == 100
    assert _on_meta(lambda: builders.densenet264(num_classes=7)).classifier.out_features == 7


@pytest.mark.parametrize("depth, layers", [(10, 1), (40, 6), (100, 16)])
def test_densenet_bc_has_three_blocks_of_depth_minus_4_over_6_layers(depth, layers):
    model = _on_meta(lambda: builders.densenet_bc(depth, growth_rate=8))
    assert [len(getattr(model.features, f"denseblock{i}")) for i in (1, 2, 3)] == [layers] * 3
    assert not hasattr(model.features, "denseblock4") and model.classifier.out_features == 10
    conv0 = model.features.conv0
    assert conv0.kernel_size == (3, 3) and conv0.stride == (1, 1) and conv0.out_channels == 16
    assert not hasattr(model.features, "pool0")
    imagenet_stem = _on_meta(lambda: builders.densenet_bc(depth, small_inputs=False))
    assert imagenet_stem.features.conv0.kernel_size == (7, 7) and hasattr(imagenet_stem.features, "pool0")


@pytest.mark.parametrize("depth", [4, 11, 40.0, "40", True])
def test_densenet_bc_refuses_depths_that_are_not_6n_plus_4(depth):
    with pytest.raises(ValueError, match=r"DenseNet-BC depth must be 6n \+ 4 with n >= 1"):
        builders.densenet_bc(depth)


@pytest.mark.slow
def test_the_package_imports_torchvision_only_when_a_builder_is_used():
    script = (
        "import sys\n"
        "import densenet_fast, densenet_fast.models, densenet_fast.convert\n"
        "assert 'torchvision' not in sys.modules, 'import densenet_fast imported torchvision'\n"
        "builder = densenet_fast.densenet121\n"
        "import densenet_fast.builders\n"
        "assert builder is densenet_fast.builders.densenet121, builder.__module__\n"
        "from densenet_fast import densenet_bc\n"
        "assert densenet_bc is densenet_fast.builders.densenet_bc\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(
        builders.__file__)), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
