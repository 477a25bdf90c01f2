"""The whole model on backend "triton" against the naive reference DenseNet (same state_dict):
outputs, input gradient, every parameter gradient and the running statistics.

On a machine without CUDA the kernels run in Triton's interpreter on CPU tensors.
"""
import pytest
import torch

import densenet_fast
from densenet_fast.reference import DenseNet as ReferenceDenseNet
from helpers import TRITON_DEVICE as DEVICE, randomize_bn

# Every test runs with backend "triton" pinned, in full float32 (on a GPU the reference's cuDNN
# convolutions would use TF32 by default): the conftest fixtures.
pytestmark = [pytest.mark.usefixtures("backend", "full_float32"),
              pytest.mark.parametrize("backend", ["triton"], indirect=True)]


def _pair(channels_last: bool, drop_rate: float = 0.0):
    torch.manual_seed(0)
    ours = randomize_bn(densenet_fast.densenet_bc(depth=10, growth_rate=4, drop_rate=drop_rate))
    ref = ReferenceDenseNet(4, (1, 1, 1), 8, num_classes=10, small_inputs=True, drop_rate=drop_rate)
    ref.load_state_dict(ours.state_dict())
    ours, ref = ours.to(DEVICE), ref.to(DEVICE)
    if channels_last:
        ours, ref = ours.to(memory_format=torch.channels_last), ref.to(memory_format=torch.channels_last)
    return ours, ref


def _run(model, x, seed=1):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = model(x)
    torch.manual_seed(2)
    out.backward(torch.randn_like(out))
    return out.detach(), x.grad


@pytest.mark.slow
@pytest.mark.parametrize("channels_last, drop_rate", [(False, 0.0), (True, 0.0), (False, 0.3)],
                         ids=["nchw", "channels_last", "dropout"])
def test_train_step_matches_reference(channels_last, drop_rate):
    ours, ref = _pair(channels_last, drop_rate)
    torch.manual_seed(3)
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out, gx = _run(ours, x)
    out_ref, gx_ref = _run(ref, x)
    torch.testing.assert_close(out, out_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    ref_buffers = dict(ref.named_buffers())
    for name, b in ours.named_buffers():
        torch.testing.assert_close(b, ref_buffers[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_eval_forward_matches_reference():
    ours, ref = _pair(False)
    ours.eval(), ref.eval()
    torch.manual_seed(4)
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


def test_backend_serves_only_what_it_can():
    from densenet_fast.ops import backend_for

    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    assert backend_for(x).name == "triton"
    with pytest.raises(TypeError):
        backend_for(x.double())


@pytest.mark.skipif(DEVICE != "cuda", reason="torch.compile traces the Triton kernels on CUDA only")
def test_ops_trace_under_torch_compile():
    """A layer's two forward ops in one fullgraph-compiled function (``out`` mutated in place) match eager."""
    from densenet_fast.ops.triton import bn_relu_conv1x1, bn_relu_conv3x3

    def layer(x, scale, shift, w1, w2, out):
        z, mean, var = bn_relu_conv1x1(x, scale, shift, w1, True)
        scale2 = torch.rsqrt(var + 1e-5)
        mean2, var2 = bn_relu_conv3x3(z, scale2, -mean * scale2, w2, out, None, True)
        return z, mean2, var2

    torch.manual_seed(5)
    buf = torch.randn(2, 30, 6, 7, device=DEVICE)
    scale, shift = torch.rand(21, device=DEVICE) + 0.5, torch.randn(21, device=DEVICE)
    w1, w2 = torch.randn(16, 21, 1, 1, device=DEVICE) / 5, torch.randn(5, 16, 3, 3, device=DEVICE) / 12
    eager_buf, compiled_buf = buf.clone(), buf.clone()
    expected = layer(eager_buf[:, :21], scale, shift, w1, w2, eager_buf[:, 23:28])
    got = torch.compile(layer, fullgraph=True)(compiled_buf[:, :21], scale, shift, w1, w2, compiled_buf[:, 23:28])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled_buf, eager_buf, atol=1e-5, rtol=1e-5)
