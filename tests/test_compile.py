"""torch.compile traces a whole stage as one custom op: fullgraph, equal results, no recompiles."""
import copy

import pytest
import torch
import torch._dynamo

import densenet_fast


def _compiled_trains_like_eager(model_kwargs=None, **compile_kwargs):
    """Three training steps of the compiled model beside an eager deep copy: outputs, every
    parameter grad (accumulated over the steps) and every buffer (running stats) equal, no recompiles."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = densenet_fast.DenseNet(**(model_kwargs or dict(growth_rate=4, block_config=(2, 2), num_init_features=8)),
                                   num_classes=3, small_inputs=True)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, **compile_kwargs)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(3):
            out, out_eager = compiled(x), eager(x)
            torch.testing.assert_close(out, out_eager, msg=f"step {step} output")
            out.sum().backward()
            out_eager.sum().backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for (name, b), c in zip(model.named_buffers(), eager.buffers()):
        torch.testing.assert_close(b, c, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiled_model_trains_like_eager(compile_backend):
    _compiled_trains_like_eager(backend=compile_backend)


@pytest.mark.slow
def test_compiled_model_keeping_its_bottlenecks_trains_like_eager():
    """memory_efficient=False returns the kept bottlenecks from the stage op: Inductor checks their
    strides against the stage's fake, which states the backend's layout (the cpp backend's 64-channel
    float32 bottlenecks are channels_last). Inductor's on-disk caches are off for it: their keys do
    not cover a custom op's fake, so a graph cached under other fake strides would stand in."""
    import torch._functorch.config
    import torch._inductor.config

    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        _compiled_trains_like_eager(dict(growth_rate=16, block_config=(2,), num_init_features=8, bn_size=4,
                                         memory_efficient=False), backend="inductor")


@pytest.mark.slow
def test_reduce_overhead_compiled_model_trains_like_eager():
    """mode="reduce-overhead" (Inductor with CUDA graphs, issue 11's graph-capturable step) compiles
    the model whole and trains like eager. On CPU it captures no CUDA graph, so this checks the
    mode's compile and training path; tests/test_cuda.py checks the graphs themselves."""
    _compiled_trains_like_eager(mode="reduce-overhead")


def test_compiled_eval_and_no_grad():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = densenet_fast.DenseNet(4, (2, 2), 8, num_classes=3, small_inputs=True).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
