"""Whole models on the compiled extension's backends against ``densenet_fast.reference.DenseNet`` in float64.

Each test runs on backend "cpp" (the fused CPU ops) and on backend "composite" (the extension's
per-channel kernels around ATen's convolutions: what CUDA runs without Triton, here over the CPU
builds of the same kernels). One training step (forward, backward) of a small DenseNet with random
BN affine parameters and running statistics: outputs, the input gradient, every parameter gradient
and the running statistics afterwards must match the naive cat -> BN -> ReLU -> conv model.
"""
from __future__ import annotations

import os

import pytest
import torch

import densenet_fast
from densenet_fast import reference
from densenet_fast.ops import registry

if os.environ.get("DENSENET_FAST_BUILD_EXT", "").strip() == "0":
    pytest.skip("installed with DENSENET_FAST_BUILD_EXT=0: no compiled extension", allow_module_level=True)

from helpers import TOLERANCES, randomize_bn

ATOL, RTOL = TOLERANCES["model"][torch.float64]

SMALL = dict(growth_rate=6, block_config=(3, 2), num_init_features=10, bn_size=2, num_classes=5)


# Every test runs with each backend pinned (the conftest fixture; it fails where one is missing).
pytestmark = [pytest.mark.usefixtures("backend"),
              pytest.mark.parametrize("backend", ["cpp", "composite"], indirect=True)]


def model_pair(seed=0, **kwargs):
    torch.manual_seed(seed)
    config = {**SMALL, **kwargs}
    fast = densenet_fast.DenseNet(**config).double()
    randomize_bn(fast, seed + 1)
    ref = reference.DenseNet(**{k: v for k, v in config.items()}).double()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def step(model, x, grad_seed, backend=None):
    """One forward/backward; returns output, input grad, parameter grads and buffers."""
    x = x.clone().requires_grad_()
    out = model(x)
    g = torch.Generator().manual_seed(grad_seed)
    out.backward(torch.randn(out.shape, generator=g, dtype=out.dtype))
    grads = {name: p.grad for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return out.detach(), x.grad, grads, buffers


def assert_same_step(fast_result, ref_result):
    out, grad_x, grads, buffers = fast_result
    r_out, r_grad_x, r_grads, r_buffers = ref_result
    torch.testing.assert_close(out, r_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(grad_x, r_grad_x, atol=ATOL, rtol=RTOL)
    assert grads.keys() == r_grads.keys()
    for name in grads:
        assert grads[name] is not None, name
        torch.testing.assert_close(grads[name], r_grads[name], atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")
    assert buffers.keys() == r_buffers.keys()
    for name in buffers:
        torch.testing.assert_close(buffers[name], r_buffers[name], atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


def input_batch(shape, seed, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def test_cpp_is_preferred_on_cpu_and_composite_only_when_pinned(backend):
    assert {"cpp", "composite"} <= set(densenet_fast.available_backends())
    assert registry.backend_for(torch.ones(1, 2, 3, 3)).name == backend
    with densenet_fast.use_backend(None):  # automatic choice inside this module's pin
        assert registry.backend_for(torch.ones(1, 2, 3, 3)).name == "cpp"
        # What it can't compute falls back to the portable backend.
        assert registry.backend_for(torch.ones(1, 2, 3, 3, dtype=torch.bfloat16)).name == "torch"


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_training_step_matches_reference(channels_last, memory_efficient):
    fast, ref = model_pair(seed=1, memory_efficient=memory_efficient)
    x = input_batch((2, 3, 37, 35), seed=2, channels_last=channels_last)
    assert_same_step(step(fast, x, 3), step(ref, x, 3))


def test_small_inputs_batch_one_odd_sizes():
    fast, ref = model_pair(seed=4, small_inputs=True, growth_rate=5, block_config=(2, 3, 2), num_init_features=7)
    x = input_batch((1, 3, 11, 9), seed=5)
    assert_same_step(step(fast, x, 6), step(ref, x, 6))


def test_eval_mode_uses_running_stats():
    fast, ref = model_pair(seed=7)
    fast.eval()
    ref.eval()
    x = input_batch((2, 3, 33, 31), seed=8)
    assert_same_step(step(fast, x, 9), step(ref, x, 9))


def test_dropout_with_the_same_seed():
    fast, ref = model_pair(seed=10, drop_rate=0.25)
    x = input_batch((2, 3, 29, 27), seed=11)
    torch.manual_seed(12)
    fast_result = step(fast, x, 13)
    torch.manual_seed(12)
    assert_same_step(fast_result, step(ref, x, 13))


# 64-channel bottlenecks: the cpp backend's float32 bottlenecks are channels_last from 64 channels
# (csrc's bottleneck_format), recomputed or kept (memory_efficient=False).
WIDE_BOTTLENECKS = dict(growth_rate=16, bn_size=4)


@pytest.mark.parametrize("config", [{}, WIDE_BOTTLENECKS, {**WIDE_BOTTLENECKS, "memory_efficient": False}],
                         ids=["small", "wide_bottlenecks", "wide_bottlenecks_kept"])
def test_float32_step_close_to_reference(config):
    fast, ref = model_pair(seed=17, **config)
    fast, ref = fast.float(), ref.float()
    x = input_batch((2, 3, 37, 35), seed=18).float()
    out, grad_x, grads, buffers = step(fast, x, 19)
    r_out, r_grad_x, r_grads, r_buffers = step(ref, x, 19)
    torch.testing.assert_close(out, r_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad_x, r_grad_x, atol=1e-4, rtol=1e-4)
    for name in grads:
        torch.testing.assert_close(grads[name], r_grads[name], atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")
    for name in buffers:
        torch.testing.assert_close(buffers[name], r_buffers[name], atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("train", [True, False])
def test_no_grad_and_inference_mode(train):
    # The fused ops run ATen GEMMs on worker threads: the caller's grad/inference mode must hold there.
    fast, ref = model_pair(seed=20)
    fast.train(train)
    ref.train(train)
    x = input_batch((2, 3, 37, 35), seed=21)
    with torch.no_grad():
        expected = ref(x)
        out = fast(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), expected, atol=ATOL, rtol=RTOL)
