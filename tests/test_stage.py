"""The block algorithm on its own: gradcheck, input checks, backend selection."""
import pytest
import torch

import densenet_fast
from densenet_fast.models import _DenseBlock, _Transition
from densenet_fast.ops import registry as ops
from densenet_fast.stage import Stage, dense_stage
from helpers import randomize_bn


def _block_and_transition(dtype=torch.float64):
    torch.manual_seed(0)
    block = _DenseBlock(num_layers=2, num_input_features=3, bn_size=2, growth_rate=2, drop_rate=0.0).to(dtype)
    transition = _Transition(7, 3).to(dtype)
    return randomize_bn(block, running_stats=False), randomize_bn(transition, running_stats=False)


@pytest.mark.parametrize("with_transition", [False, True])
def test_gradcheck_tiny_block(with_transition):
    block, transition = _block_and_transition()
    holder = torch.nn.ModuleDict({"block": block, "transition": transition})
    names = [n for n, _ in holder.named_parameters()]
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in holder.parameters()]

    def f(x, *params):
        stage = block.stage(transition if with_transition else None)
        return _with_params(holder, names, params, lambda: dense_stage(x, stage))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, fast_mode=True)


def _with_params(holder, names, params, fn):
    """Run fn with holder's parameters replaced by ``params`` (tensors that gradcheck perturbs)."""
    originals = {}
    for name, p in zip(names, params):
        module_name, _, attr = name.rpartition(".")
        module = holder.get_submodule(module_name)
        originals[name] = module._parameters[attr]
        module._parameters[attr] = p
    try:
        return fn()
    finally:
        for name in names:
            module_name, _, attr = name.rpartition(".")
            holder.get_submodule(module_name)._parameters[attr] = originals[name]


def test_block_returns_all_features_and_transition_pools():
    block, transition = _block_and_transition()
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    features = block(x)
    assert features.shape == (2, 7, 5, 4)
    torch.testing.assert_close(features[:, :3], x)
    assert transition(features).shape == (2, 3, 2, 2)


@pytest.mark.parametrize("bad, error, match", [
    (lambda: torch.randn(2, 5, 8, 8), ValueError, r"expected an input of shape \(N, 3, H, W\), got \(2, 5, 8, 8\)"),
    (lambda: torch.randn(3, 8, 8), ValueError, r"expected an input of shape \(N, 3, H, W\), got \(3, 8, 8\)"),
    (lambda: torch.randn(2, 3, 8, 8, dtype=torch.float64), TypeError, r"expected input dtype torch.float32"),
    (lambda: torch.randint(0, 5, (2, 3, 8, 8)), TypeError, r"expected input dtype torch.float32"),
])
def test_model_rejects_bad_input(bad, error, match):
    model = densenet_fast.DenseNet(4, (1, 1), 8, num_classes=3, small_inputs=True)
    with pytest.raises(error, match=match):
        model(bad())


def test_block_rejects_bad_input():
    block, transition = _block_and_transition()
    with pytest.raises(ValueError, match="expected an input with 3 channels, got 4"):
        block(torch.randn(2, 4, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected a 4-D input"):
        block(torch.randn(2, 3, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="expected input dtype torch.float64"):
        block(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="H and W of at least 2"):
        transition(torch.randn(2, 7, 1, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        block(torch.randn(1, 3, 1, 1, dtype=torch.float64))


def test_use_backend_pins_inside_the_block_and_restores_the_previous_pin():
    assert densenet_fast.get_backend_name() is None
    with densenet_fast.use_backend("torch"):
        assert densenet_fast.get_backend_name() == "torch"
        with densenet_fast.use_backend(None):  # automatic choice, inside a pin
            assert densenet_fast.get_backend_name() is None
        assert densenet_fast.get_backend_name() == "torch"
        with pytest.raises(KeyError):
            with densenet_fast.use_backend("torch"):
                raise KeyError("the block failed")
        assert densenet_fast.get_backend_name() == "torch"
    assert densenet_fast.get_backend_name() is None
    with pytest.raises(ValueError, match="unknown densenet_fast backend 'nope'"):
        with densenet_fast.use_backend("nope"):
            pass
    assert densenet_fast.get_backend_name() is None


def test_backend_selection(monkeypatch):
    assert "torch" in densenet_fast.available_backends()
    with pytest.raises(ValueError, match="unknown densenet_fast backend 'nope'"):
        densenet_fast.set_backend("nope")
    try:
        densenet_fast.set_backend("torch")
        assert densenet_fast.get_backend_name() == "torch"
    finally:
        densenet_fast.set_backend(None)
    monkeypatch.setenv("DENSENET_FAST_BACKEND", "nope")
    model = densenet_fast.DenseNet(4, (1,), 8, num_classes=3, small_inputs=True)
    with pytest.raises(ValueError, match="unknown densenet_fast backend 'nope'"):
        model(torch.randn(2, 3, 4, 4))
    monkeypatch.setenv("DENSENET_FAST_BACKEND", "torch")
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 3)


def test_unavailable_backend_names_what_is_available():
    def broken():
        raise ImportError("compiled without it")

    ops.register_backend("broken-for-test", broken)
    try:
        assert "broken-for-test" not in densenet_fast.available_backends()
        with pytest.raises(RuntimeError, match=r"'broken-for-test' is not available here \(ImportError: compiled "
                                               r"without it\); available backends: \[.*'torch'"):
            densenet_fast.set_backend("broken-for-test")
    finally:
        ops._FACTORIES.pop("broken-for-test")


def test_automatic_choice_asks_each_backend_what_it_supports(monkeypatch):
    """backend_for takes the first preferred backend whose supports() has no reason against the
    tensors; a pinned backend raises its reason as its error."""
    from densenet_fast.ops.interface import Unsupported
    from densenet_fast.ops.torch_backend import TorchBackend

    class Float32Only(TorchBackend):
        name = "float32-only-for-test"

        def supports(self, x):
            return None if x.dtype == torch.float32 else Unsupported(f"float32 only, got {x.dtype}", TypeError)

    ops.register_backend(Float32Only.name, Float32Only)
    monkeypatch.setitem(ops._PREFERENCE, "cpu", [Float32Only.name, "torch"])
    try:
        assert ops.backend_for(torch.ones(1)).name == Float32Only.name
        assert ops.backend_for(torch.ones(1, dtype=torch.float64)).name == "torch"
        with densenet_fast.use_backend(Float32Only.name):
            with pytest.raises(TypeError, match="float32 only, got torch.float64"):
                ops.backend_for(torch.ones(1, dtype=torch.float64))
    finally:
        ops._FACTORIES.pop(Float32Only.name)
        ops._instances.pop(Float32Only.name, None)


def test_stage_needs_layers_or_transition():
    with pytest.raises(ValueError, match="at least one dense layer or a transition"):
        Stage([], None)


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_out_of_memory_names_the_block_and_the_model_stays_usable(monkeypatch, phase):
    model = densenet_fast.DenseNet(4, (2, 2), 8, num_classes=3, small_inputs=True)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = model(x)
    backend = ops.backend_for(x)
    op = "bn_relu_conv3x3" if phase == "forward" else "bn_relu_conv3x3_backward"
    real = getattr(type(backend), op)
    calls = {"n": 0}

    def exhausted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the second block's first layer (forward) / a later layer (backward)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(backend), op, exhausted)
    with pytest.raises(torch.OutOfMemoryError, match=r"out of memory in the " + phase + r" of features\.denseblock"
                       r".*batch 2, \d+x\d+.*try a smaller batch"):
        model(x).sum().backward()
    monkeypatch.setattr(type(backend), op, real)
    model.zero_grad()
    out = model(x)
    out.sum().backward()
    assert out.shape == expected.shape and all(p.grad is not None for p in model.parameters())


def test_model_rejects_too_small_inputs_and_device_mix():
    model = densenet_fast.densenet121()
    assert model.min_input_size() == 29
    with pytest.raises(ValueError, match=r"input of 28x224 is too small for this DenseNet: .* 3 transitions need H "
                                         r"and W of at least 29"):
        model(torch.randn(1, 3, 28, 224))
    bc = densenet_fast.densenet_bc(depth=40)
    assert bc.min_input_size() == 4
    with pytest.raises(RuntimeError, match="expected input on cpu .*got meta"):
        bc(torch.empty(2, 3, 32, 32, device="meta"))
