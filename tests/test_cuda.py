"""The model on CUDA with every backend built for it, against references: training steps against
the naive reference (outputs, input grads, every parameter grad, running stats), autocast against
torchvision under the same autocast, GradScaler, channels_last, device moves, torch.compile with
Inductor (default and reduce-overhead), a whole training step captured in a CUDA graph and
replayed, and the errors of a device mix.

These need a GPU: they run in ``tools/gpu_check`` (its test stage runs this file first). On a
machine without CUDA, the same behaviours are tested on CPU by test_models, test_precision_and_layout,
test_round_trips and test_compile.
"""
import copy

import pytest
import torch
import torch._dynamo
import torchvision
from torch import nn

import densenet_fast
from helpers import autocast_errors, compare_with_reference, randomize_bn, reference_twin

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs in tools/gpu_check)")
DEVICE = "cuda"
# Each backend pinned in turn by the conftest fixture: plain names, so that one missing on a CUDA
# machine (where every backend should be available) fails its tests with use_backend's reason.
# ("cpp" is the fused CPU backend; the extension's CUDA kernels run as "composite".)
every_backend = pytest.mark.parametrize("backend", ["triton", "composite", "torch"], indirect=True)

# A net with both stems' worth of shape changes: odd sizes, a transition, two blocks.
CONFIG = dict(growth_rate=8, block_config=(2, 3), num_init_features=16, bn_size=2, num_classes=5)
SMALL = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3, small_inputs=True)


def _input(shape, seed=1, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@every_backend
@pytest.mark.parametrize("channels_last, drop_rate", [(False, 0.0), (True, 0.0), (False, 0.2)],
                         ids=["nchw", "channels_last", "dropout"])
def test_train_steps_match_reference(backend, full_float32, channels_last, drop_rate):
    torch.manual_seed(0)
    config = dict(CONFIG, drop_rate=drop_rate)
    model = densenet_fast.DenseNet(**config)
    randomize_bn(model)
    ref = reference_twin(model, **config)
    model, ref = model.to(DEVICE), ref.to(DEVICE)
    x = _input((3, 3, 37, 29))
    if channels_last:
        model, ref = model.to(memory_format=torch.channels_last), ref.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    compare_with_reference(model, ref, x)


@every_backend
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_error_is_a_small_multiple_of_torchvisions(backend, dtype):
    torch.manual_seed(0)
    fast = densenet_fast.DenseNet(**CONFIG)
    tv = torchvision.models.DenseNet(**CONFIG)
    tv.load_state_dict(fast.state_dict())
    ref = torchvision.models.DenseNet(**CONFIG).double()
    ref.load_state_dict(fast.state_dict())
    fast, tv, ref = fast.to(DEVICE), tv.to(DEVICE), ref.to(DEVICE)
    x = _input((4, 3, 32, 32))
    out, fast_out_err, fast_grad_err = autocast_errors(fast, ref, x, dtype)
    ref.zero_grad()
    out_tv, tv_out_err, tv_grad_err = autocast_errors(tv, ref, x, dtype)
    assert out.dtype == out_tv.dtype == dtype
    assert fast_out_err <= 3 * tv_out_err, (fast_out_err, tv_out_err)
    assert fast_grad_err <= 3 * tv_grad_err, (fast_grad_err, tv_grad_err)
    for name, p in fast.named_parameters():
        assert p.grad.dtype == torch.float32, name  # parameters and their grads stay fp32 under autocast
    for name, b in fast.named_buffers():
        if b.is_floating_point():
            assert b.dtype == torch.float32 and torch.isfinite(b).all(), name  # running stats too


@every_backend
def test_grad_scaler_steps_without_overflow(backend):
    torch.manual_seed(0)
    model = densenet_fast.DenseNet(**CONFIG).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 10)
    x = _input((4, 3, 32, 32), seed=2)
    target = torch.tensor([0, 1, 2, 3], device=DEVICE)
    before = model.classifier.weight.detach().clone()
    for _ in range(3):
        with torch.autocast(DEVICE, dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    # The scale only shrinks when a scaled gradient overflowed and its step was skipped.
    assert scaler.get_scale() == 2.0 ** 10
    assert torch.isfinite(model.classifier.weight).all() and not torch.equal(before, model.classifier.weight)


@every_backend
def test_channels_last_gives_channels_last_and_same_numbers(backend, full_float32):
    torch.manual_seed(0)
    model = densenet_fast.DenseNet(**CONFIG).to(DEVICE)
    randomize_bn(model)
    x = _input((2, 3, 33, 31), seed=3)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    x = x.requires_grad_(True)
    features = model.features(x)
    features_cl = model.features(x_cl)
    assert features_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(features_cl, features, atol=2e-4, rtol=2e-3)
    g = _input(features.shape, seed=4)
    params = list(model.features.parameters())
    grads = torch.autograd.grad(features, [x] + params, g)
    grads_cl = torch.autograd.grad(features_cl, [x_cl] + params, g)
    for a, b in zip(grads_cl, grads):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-3)


def test_moves_between_cpu_and_cuda(full_float32):
    """Each device's default backend (a pinned backend would serve both)."""
    torch.manual_seed(0)
    model = densenet_fast.DenseNet(**SMALL)
    model(torch.randn(2, 3, 8, 8))  # running stats off their initial values
    model.eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        on_cpu = model(x)
        on_cuda = model.to(DEVICE)(x.to(DEVICE))
        assert on_cuda.device.type == "cuda"
        torch.testing.assert_close(on_cuda.cpu(), on_cpu, atol=2e-4, rtol=2e-3)
        half = copy.deepcopy(model).half()(x.to(DEVICE, torch.float16))
        assert half.dtype == torch.float16
        torch.testing.assert_close(half.float().cpu(), on_cpu, atol=0.05, rtol=0.05)
        back = model.to("cpu")(x)
    torch.testing.assert_close(back, on_cpu, rtol=0, atol=0)
    # A state_dict saved from CUDA loads into a CPU model.
    other = densenet_fast.DenseNet(**SMALL).eval()
    other.load_state_dict(model.to(DEVICE).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(x), on_cpu, rtol=0, atol=0)


def test_pinned_cpp_on_cuda_names_the_composite_backend():
    model = densenet_fast.DenseNet(**SMALL).to(DEVICE)
    with densenet_fast.use_backend("cpp"):
        with pytest.raises(RuntimeError, match="backend 'cpp' runs on CPU tensors; the extension's CUDA kernels run "
                                               "as backend 'composite'"):
            model(torch.randn(2, 3, 8, 8, device=DEVICE))


def test_device_mix_is_one_clear_error():
    model = densenet_fast.DenseNet(**SMALL).to(DEVICE)
    with pytest.raises(RuntimeError, match="expected input on cuda"):
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(RuntimeError, match="expected input on cpu"):
        densenet_fast.DenseNet(**SMALL)(torch.randn(2, 3, 8, 8, device=DEVICE))


def _train_beside_eager(compiled, model, eager, x, check=None):
    """Three steps of ``compiled`` (of ``model``) beside ``eager``, a copy: outputs every step, then
    every grad and buffer; ``check()`` (after the steps, before the comparisons) must hold."""
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(3):
            out, out_eager = compiled(x), eager(x)
            torch.testing.assert_close(out, out_eager, atol=2e-4, rtol=2e-3, msg=lambda m: f"step {step}: {m}")
            out.sum().backward()
            out_eager.sum().backward()
    if check is not None:
        assert check(), ("the check after the steps failed "
                         "(reduce-overhead: CUDA graphs skipped; the warning above says why)")
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=2e-4, rtol=2e-3, msg=lambda m: f"{name}: {m}")
    for (name, b), c in zip(model.named_buffers(), eager.buffers()):
        torch.testing.assert_close(b, c, atol=2e-4, rtol=2e-3, msg=lambda m: f"{name}: {m}")


def test_compiled_model_trains_like_eager(full_float32):
    """Inductor on CUDA, fullgraph, with CUDA's default backend (Inductor compiles for a minute, so
    not once per backend): each stage stays one custom op; equal results, no recompiles."""
    from densenet_fast.ops import backend_name_for

    assert backend_name_for(torch.device(DEVICE), torch.float32) == "triton"
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = densenet_fast.DenseNet(**SMALL).to(DEVICE)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    x = _input((2, 3, 8, 8))
    _train_beside_eager(compiled, model, eager, x)


def test_reduce_overhead_compiled_model_trains_like_eager(full_float32):
    """mode="reduce-overhead" (Inductor's CUDA graphs, issue 11) with CUDA's default backend: the
    forward and backward graphs are captured, not skipped, and three steps (warm-up, recording,
    replay) train like eager. The grads are allocated before the loop: a .grad that the first
    backward allocated in the graphs' pool would be overwritten by the next replay, as torch documents."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = densenet_fast.DenseNet(**SMALL).to(DEVICE)
    model = copy.deepcopy(eager)
    for p, q in zip(model.parameters(), eager.parameters()):
        p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    x = _input((2, 3, 8, 8))
    _train_beside_eager(compiled, model, eager, x, check=lambda: counters["inductor"]["cudagraph_skips"] == 0)


@every_backend
def test_captured_training_step_replays_like_eager(backend, full_float32):
    """A whole training step (forward, loss, backward, SGD with momentum) captured in one
    torch.cuda.CUDAGraph, the PyTorch docs' recipe, and replayed on new data computes what eager
    steps compute: loss, output, every grad and parameter, and the running stats, which the
    stages update with _foreach ops and no host sync, so capture records them (num_batches_tracked
    advances once per replay). The optimizer is in the graph so that each replay's parameters
    depend on the previous replay's grads and momentum buffers, as in real graphed training."""
    torch.manual_seed(0)
    model = randomize_bn(densenet_fast.DenseNet(**SMALL)).to(DEVICE)
    eager = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    batches = [(_input((2, 3, 8, 8), seed=10 + i),
                torch.randint(0, 3, (2,), generator=torch.Generator().manual_seed(20 + i)).to(DEVICE))
               for i in range(5)]  # 3 for warm-up, 2 replayed
    warmup, replayed = batches[:3], batches[3:]

    def train_step(net, optimizer, x, target):
        out = net(x)
        loss = nn.functional.cross_entropy(out, target)
        loss.backward()
        optimizer.step()
        return out, loss

    def eager_step(x, target):
        opt_eager.zero_grad(set_to_none=True)
        return train_step(eager, opt_eager, x, target)

    static_x, static_target = torch.empty_like(batches[0][0]), torch.empty_like(batches[0][1])
    # Warm-up on a side stream (real steps: the eager copy takes them too); it creates the momentum buffers.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, target in warmup:
            static_x.copy_(x)
            static_target.copy_(target)
            opt.zero_grad(set_to_none=True)
            train_step(model, opt, static_x, static_target)
    torch.cuda.current_stream().wait_stream(side)
    for x, target in warmup:
        eager_step(x, target)

    graph = torch.cuda.CUDAGraph()
    # Grads to None before capture: the captured backward allocates them in the graph's pool and
    # each replay refills them in place (no zero_grad between replays).
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_out, static_loss = train_step(model, opt, static_x, static_target)

    for i, (x, target) in enumerate(replayed):
        static_x.copy_(x)
        static_target.copy_(target)
        graph.replay()
        out, loss = eager_step(x, target)
        torch.testing.assert_close(static_loss, loss, atol=2e-4, rtol=2e-3, msg=lambda m: f"replay {i} loss: {m}")
        torch.testing.assert_close(static_out, out, atol=2e-4, rtol=2e-3, msg=lambda m: f"replay {i} output: {m}")
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=2e-4, rtol=2e-3,
                                       msg=lambda m: f"replay {i} {name} grad: {m}")
            torch.testing.assert_close(p, q, atol=2e-4, rtol=2e-3, msg=lambda m: f"replay {i} {name}: {m}")
        for (name, b), c in zip(model.named_buffers(), eager.buffers()):
            torch.testing.assert_close(b, c, atol=2e-4, rtol=2e-3, msg=lambda m: f"replay {i} {name}: {m}")
            if name.endswith("num_batches_tracked"):
                assert int(b) == len(warmup) + i + 1, (name, int(b))
