"""The fast DenseNet against the naive reference, in float64: outputs, input grads, every parameter
grad, running stats after two steps, and eval-mode outputs, over configurations and odd shapes."""
import pytest
import torch
from torch import nn

import densenet_fast
from helpers import backend_params, compare_with_reference, randomize_bn, reference_twin

# Every model test runs on each CPU backend in float64 (triton has no float64: its model tests,
# tests/test_triton_model.py, run float32 in its interpreter).
pytestmark = [pytest.mark.usefixtures("backend"),
              pytest.mark.parametrize("backend", backend_params("torch", "cpp", "composite"), indirect=True)]


def _build(seed=0, dtype=torch.float64, **config):
    torch.manual_seed(seed)
    model = randomize_bn(densenet_fast.DenseNet(**config).to(dtype))
    return model, reference_twin(model, **config)


def _input(shape, dtype=torch.float64, seed=1):
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


CONFIGS = {
    # name: (config, input shape)
    "imagenet-stem": (dict(growth_rate=8, block_config=(2, 3), num_init_features=16, num_classes=7), (2, 3, 33, 29)),
    "cifar-stem": (dict(growth_rate=4, block_config=(2, 2, 2), num_init_features=8, num_classes=10,
                        small_inputs=True), (3, 3, 9, 7)),
    "odd-growth-and-bn-size": (dict(growth_rate=5, block_config=(1, 2, 1), num_init_features=6, bn_size=3,
                                    num_classes=4, small_inputs=True), (2, 3, 11, 13)),
    "single-layer-blocks": (dict(growth_rate=3, block_config=(1, 1), num_init_features=5, bn_size=2,
                                 num_classes=3, small_inputs=True), (2, 3, 6, 6)),
    "single-block": (dict(growth_rate=4, block_config=(3,), num_init_features=8, num_classes=5,
                          small_inputs=True), (2, 3, 5, 4)),
    "batch-1-non-square": (dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5,
                                small_inputs=True), (1, 3, 7, 12)),
    "five-blocks": (dict(growth_rate=2, block_config=(1, 2, 1, 1, 1), num_init_features=4, num_classes=3,
                         small_inputs=True), (2, 3, 17, 16)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference(name):
    config, shape = CONFIGS[name]
    model, ref = _build(**config)
    compare_with_reference(model, ref, _input(shape))


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_memory_efficient_modes_match_reference(memory_efficient):
    config, shape = CONFIGS["cifar-stem"]
    model, ref = _build(memory_efficient=memory_efficient, **config)
    compare_with_reference(model, ref, _input(shape))


def test_dropout_matches_reference_masks():
    # Seeded identically, our masks are F.dropout's masks, and backward reuses them.
    config = dict(growth_rate=4, block_config=(2, 3), num_init_features=8, num_classes=5, small_inputs=True,
                  drop_rate=0.3)
    model, ref = _build(**config)
    compare_with_reference(model, ref, _input((3, 3, 8, 8)))


def test_frozen_batchnorm_and_frozen_parameters():
    config, shape = CONFIGS["imagenet-stem"]
    model, _ = _build(**config)
    # Freeze the first block's BNs (eval mode, no grads) and one conv, as in fine-tuning.
    for name, m in model.named_modules():
        if name.startswith("features.denseblock1") and isinstance(m, nn.BatchNorm2d):
            m.eval()
            m.weight.requires_grad_(False)
            m.bias.requires_grad_(False)
    model.features.transition1.norm.eval()
    model.features.denseblock2.denselayer2.conv1.weight.requires_grad_(False)
    ref = reference_twin(model, **config)
    compare_with_reference(model, ref, _input(shape))


@pytest.mark.parametrize("setting", ["momentum-none", "no-running-stats", "eps-and-momentum"])
def test_batchnorm_settings(setting):
    config, shape = CONFIGS["cifar-stem"]
    model, _ = _build(**config)
    for i, m in enumerate(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        if setting == "momentum-none":
            m.momentum = None
        elif setting == "no-running-stats":
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
        else:
            m.eps, m.momentum = 1e-5 * (1 + i % 3), 0.05 * (1 + i % 4)
    ref = reference_twin(model, **config)
    compare_with_reference(model, ref, _input(shape), steps=3)


def test_input_without_grad_and_no_grad_modes():
    config, shape = CONFIGS["cifar-stem"]
    model, ref = _build(**config)
    x = _input(shape)
    model.eval()
    ref.eval()
    with torch.no_grad():
        expected = ref(x)
        out = model(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, expected)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected)
    # Training with an input that needs no grad: parameter grads still flow.
    model.train()
    ref.train()
    model(x).sum().backward()
    ref(x).sum().backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=name)


def test_train_mode_no_grad_updates_running_stats_once():
    config, shape = CONFIGS["cifar-stem"]
    model, ref = _build(**config)
    x = _input(shape)
    with torch.no_grad():
        model(x)
        ref(x)
    for (name, b), b_ref in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, b_ref, msg=name)


def test_forward_hooks_see_blocks_and_transitions():
    config, shape = CONFIGS["imagenet-stem"]
    model, ref = _build(**config)
    seen, seen_ref = [], []
    for m, log in ((model, seen), (ref, seen_ref)):
        for name in ("denseblock1", "transition1", "denseblock2"):
            getattr(m.features, name).register_forward_hook(lambda mod, i, o, log=log, name=name: log.append((name, o)))
    x = _input(shape)
    torch.testing.assert_close(model(x), ref(x))
    assert [n for n, _ in seen] == [n for n, _ in seen_ref] == ["denseblock1", "transition1", "denseblock2"]
    for (_, out), (_, out_ref) in zip(seen, seen_ref):
        torch.testing.assert_close(out, out_ref)


def test_empty_batch_in_eval_like_torchvision():
    config, _ = CONFIGS["cifar-stem"]
    model, ref = _build(**config)
    x = torch.randn(0, 3, 8, 8, dtype=torch.float64)
    assert model.eval()(x).shape == ref.eval()(x).shape == (0, 10)


def test_standalone_layer_returns_only_its_new_features():
    config, _ = CONFIGS["cifar-stem"]
    model, ref = _build(**config)
    layer, layer_ref = model.features.denseblock1.denselayer2, ref.features.denseblock1.denselayer2
    features = [_input((2, 8, 5, 5), seed=3), _input((2, 4, 5, 5), seed=4)]
    out = layer(features)
    torch.testing.assert_close(out, layer_ref(features))
    assert out.shape == (2, 4, 5, 5) and out.untyped_storage().nbytes() == out.numel() * out.element_size()
