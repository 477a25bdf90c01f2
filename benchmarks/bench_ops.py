"""Per-layer op timings: every available backend against plain PyTorch (pytest-benchmark).

    .venv/bin/python -m pytest benchmarks/bench_ops.py                 # CUDA if present, else CPU
    .venv/bin/python -m pytest benchmarks/bench_ops.py --benchmark-group-by=group -k conv1x1

Not part of the normal test run (pytest's testpaths is tests/). Each op is one group; inside it
``reference`` is what torchvision's layer does: ``conv(relu(batch_norm(x)))`` through autograd, which
materializes the normalized prefix. The shapes are a layer deep in block 1 of a DenseNet-BC (k=12):
a 256-channel prefix view of a 384-channel feature buffer, batch 16, 32x32.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import densenet_fast
from densenet_fast.ops import backend_named

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N, BUFFER_C, PREFIX_C, K, HW = 16, 384, 256, 12, 32
BOTTLENECK = 4 * K
IMPLEMENTATIONS = ["reference"] + densenet_fast.available_backends()


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


class Layer:
    """Tensors of one dense layer: the prefix view, BN coefficients, weights, incoming gradients."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)

        def rand(*shape):
            return torch.randn(*shape, generator=g).to(DEVICE)

        self.buffer = rand(N, BUFFER_C, HW, HW)
        self.x = self.buffer[:, :PREFIX_C]  # a channel-prefix view, as the block algorithm passes it
        self.gamma, self.beta = rand(PREFIX_C).abs() + 0.5, rand(PREFIX_C) * 0.1
        var, self.mean = torch.var_mean(self.x, dim=(0, 2, 3), unbiased=False)
        invstd = torch.rsqrt(var + 1e-5)
        self.scale, self.shift = self.gamma * invstd, self.beta - self.mean * self.gamma * invstd
        self.w1 = rand(BOTTLENECK, PREFIX_C, 1, 1) * PREFIX_C ** -0.5
        self.z = rand(N, BOTTLENECK, HW, HW)
        self.z_scale, self.z_shift, self.z_center = rand(BOTTLENECK).abs() + 0.5, rand(BOTTLENECK) * 0.1, \
            torch.zeros(BOTTLENECK, device=DEVICE)
        self.w3 = rand(K, BOTTLENECK, 3, 3) * (9 * BOTTLENECK) ** -0.5
        self.out = torch.empty(N, K, HW, HW, device=DEVICE)
        self.w_t = rand(PREFIX_C // 2, PREFIX_C, 1, 1) * PREFIX_C ** -0.5
        self.grad_z = rand(N, BOTTLENECK, HW, HW)
        self.grad_new = rand(N, K, HW, HW)
        self.grad_pooled = rand(N, PREFIX_C // 2, HW // 2, HW // 2)
        # The backward ops' accumulators, as the block algorithm passes them: the gradient buffer's
        # prefix (added into), and new tensors for the bottleneck and the transition (written).
        self.grad_buffer = torch.zeros_like(self.buffer)
        self.grad_x = self.grad_buffer[:, :PREFIX_C]
        self.grad_z_out = torch.empty_like(self.z)
        self.grad_x_out = torch.empty_like(self.x)


@pytest.fixture(scope="module")
def layer() -> Layer:
    return Layer()


def _backend(name: str, layer: Layer):
    try:
        backend = backend_named(name)
    except RuntimeError as err:  # not available in this installation
        pytest.skip(str(err))
    reason = backend.supports(layer.x)
    if reason is not None:
        pytest.skip(f"{name} cannot compute on {DEVICE} tensors: {reason}")
    return backend


def _bench(benchmark, group: str, fn) -> None:
    benchmark.group = group

    def timed():
        fn()
        _sync()

    benchmark(timed)


def _reference_bn_relu(x, gamma, beta):
    return F.relu(F.batch_norm(x, None, None, gamma, beta, training=True))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_channel_stats(benchmark, layer, impl):
    if impl == "reference":
        _bench(benchmark, "channel_stats", lambda: torch.var_mean(layer.x, dim=(0, 2, 3), unbiased=False))
    else:
        backend = _backend(impl, layer)
        _bench(benchmark, "channel_stats", lambda: backend.channel_stats(layer.x))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_bn_relu_conv1x1(benchmark, layer, impl):
    if impl == "reference":
        _bench(benchmark, "bn_relu_conv1x1", lambda: F.conv2d(_reference_bn_relu(layer.x, layer.gamma, layer.beta),
                                                               layer.w1))
    else:
        backend = _backend(impl, layer)
        _bench(benchmark, "bn_relu_conv1x1",
               lambda: backend.bn_relu_conv1x1(layer.x, layer.scale, layer.shift, layer.w1, True))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_bn_relu_conv1x1_backward(benchmark, layer, impl):
    if impl == "reference":
        x, gamma, beta, w = (t.detach().requires_grad_() for t in (layer.x, layer.gamma, layer.beta, layer.w1))
        y = F.conv2d(_reference_bn_relu(x, gamma, beta), w)
        _bench(benchmark, "bn_relu_conv1x1_backward",
               lambda: torch.autograd.grad(y, (x, gamma, beta, w), layer.grad_z, retain_graph=True))
    else:
        backend = _backend(impl, layer)
        _bench(benchmark, "bn_relu_conv1x1_backward", lambda: backend.bn_relu_conv1x1_backward(
            layer.grad_z, layer.x, layer.scale, layer.shift, layer.w1, layer.mean, layer.grad_x, True, True))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_bn_relu_conv3x3(benchmark, layer, impl):
    if impl == "reference":
        _bench(benchmark, "bn_relu_conv3x3", lambda: F.conv2d(
            _reference_bn_relu(layer.z, layer.z_scale, layer.z_shift), layer.w3, padding=1))
    else:
        backend = _backend(impl, layer)
        _bench(benchmark, "bn_relu_conv3x3", lambda: backend.bn_relu_conv3x3(
            layer.z, layer.z_scale, layer.z_shift, layer.w3, layer.out, None, True))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_bn_relu_conv3x3_backward(benchmark, layer, impl):
    if impl == "reference":
        z, gamma, beta, w = (t.detach().requires_grad_() for t in (layer.z, layer.z_scale, layer.z_shift, layer.w3))
        y = F.conv2d(_reference_bn_relu(z, gamma, beta), w, padding=1)
        _bench(benchmark, "bn_relu_conv3x3_backward",
               lambda: torch.autograd.grad(y, (z, gamma, beta, w), layer.grad_new, retain_graph=True))
    else:
        backend = _backend(impl, layer)
        _bench(benchmark, "bn_relu_conv3x3_backward", lambda: backend.bn_relu_conv3x3_backward(
            layer.grad_new, layer.z, layer.z_scale, layer.z_shift, layer.w3, layer.z_center, layer.grad_z_out, False,
            True))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_bn_relu_pool_conv1x1(benchmark, layer, impl):
    if impl == "reference":  # torchvision's transition: BN-ReLU-conv, then pool
        _bench(benchmark, "bn_relu_pool_conv1x1", lambda: F.avg_pool2d(
            F.conv2d(_reference_bn_relu(layer.x, layer.gamma, layer.beta), layer.w_t), 2))
    else:
        backend = _backend(impl, layer)
        _bench(benchmark, "bn_relu_pool_conv1x1",
               lambda: backend.bn_relu_pool_conv1x1(layer.x, layer.scale, layer.shift, layer.w_t))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_bn_relu_pool_conv1x1_backward(benchmark, layer, impl):
    if impl == "reference":
        x, gamma, beta, w = (t.detach().requires_grad_() for t in (layer.x, layer.gamma, layer.beta, layer.w_t))
        y = F.avg_pool2d(F.conv2d(_reference_bn_relu(x, gamma, beta), w), 2)
        _bench(benchmark, "bn_relu_pool_conv1x1_backward",
               lambda: torch.autograd.grad(y, (x, gamma, beta, w), layer.grad_pooled, retain_graph=True))
    else:
        backend = _backend(impl, layer)
        _bench(benchmark, "bn_relu_pool_conv1x1_backward", lambda: backend.bn_relu_pool_conv1x1_backward(
            layer.grad_pooled, layer.x, layer.scale, layer.shift, layer.w_t, layer.mean, layer.grad_x_out, False,
            True))
