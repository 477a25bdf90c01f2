"""The stage's per-BN bookkeeping: no host syncs in a training step, and the packed running-stats update
against torchvision's modules for every BatchNorm setting a stage can mix."""
import collections
import copy

import pytest
import torch
import torchvision
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import densenet_fast
from densenet_fast import stage as stage_module
from densenet_fast.models import _DenseBlock, _Transition
from densenet_fast.stage import dense_stage
from helpers import assert_close, backend_params, randomize_bn

# Ops that read a tensor back to the host (or wait for its values).
_HOST_READS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.allclose",
               "aten.nonzero", "aten.masked_select", "aten._unique2", "aten.unique_consecutive"}
_STAGE_OPS = {torch.ops.densenet_fast.dense_stage.default: stage_module._dense_stage_op._init_fn,
              torch.ops.densenet_fast.dense_stage_backward.default: stage_module._dense_stage_backward_op._init_fn}


class _Recorder(TorchDispatchMode):
    """Every op a stage dispatches, inside its custom ops too (each is run under the mode again)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.cross_device_copies = []
        self.casts = []  # (data_ptr, from dtype, to dtype) of every dtype conversion

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if func in _STAGE_OPS:
            with self:
                return _STAGE_OPS[func](*args, **kwargs)
        out = func(*args, **kwargs)
        if name in ("aten._to_copy", "aten.to") and out is not args[0] and out.dtype != args[0].dtype:
            self.casts.append((args[0].data_ptr(), args[0].dtype, out.dtype))
        if name in ("aten.copy_", "aten._to_copy", "aten.to"):
            src = args[1] if name == "aten.copy_" else args[0]
            dst = args[0] if name == "aten.copy_" else out
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.device != dst.device:
                self.cross_device_copies.append((name, src.device, dst.device))
        return out


def _stage(momentum=0.1, dtype=torch.float64, device="cpu"):
    torch.manual_seed(0)
    blk = _DenseBlock(num_layers=3, num_input_features=5, bn_size=2, growth_rate=3, drop_rate=0.2).to(dtype)
    tr = _Transition(14, 4).to(dtype)
    for m in list(randomize_bn(blk).modules()) + list(randomize_bn(tr).modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
    return blk.to(device), tr.to(device)


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("backend, dtype", backend_params(("cpp", torch.float64), ("composite", torch.float64),
                                                           ("torch", torch.float64), ("triton", torch.float32),
                                                           slow=("triton",)),
                         indirect=["backend"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_training_step_of_a_stage_reads_nothing_back(backend, dtype, momentum, device):
    blk, tr = _stage(momentum, dtype, device)
    x = torch.randn(2, 5, 6, 6, dtype=dtype, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_(True)
    recorder = _Recorder()
    with recorder:
        for _ in range(2):  # the second step updates running stats that are not fresh
            out = dense_stage(x, blk.stage(tr))
            out.backward(torch.ones_like(out))
    # The op really ran (and was looked into): its bookkeeping went by.
    assert recorder.ops["densenet_fast.dense_stage"] == 2 and recorder.ops["densenet_fast.dense_stage_backward"] == 2
    assert recorder.ops["aten._foreach_lerp_"] >= 2 and x.grad is not None
    assert not _HOST_READS & set(recorder.ops), {k: recorder.ops[k] for k in _HOST_READS & set(recorder.ops)}
    assert not recorder.cross_device_copies
    assert int(blk.denselayer1.norm1.num_batches_tracked) == 2


@pytest.mark.parametrize("backend", backend_params("cpp", "composite", "torch"), indirect=True)
def test_training_step_of_a_model_reads_nothing_back(backend):
    """The whole model under the profiler (a dispatch mode would make it run its modules)."""
    model = densenet_fast.DenseNet(4, (2, 2), 8, num_classes=3, small_inputs=True, drop_rate=0.1)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    model(x).sum().backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x).sum().backward()
    names = collections.Counter(e.name for e in prof.events())
    assert names["densenet_fast::dense_stage"] == 2 and names["densenet_fast::dense_stage_backward"] == 2
    assert not {"aten::_local_scalar_dense", "aten::item"} & set(names)


def test_conv_weights_are_cast_once_per_step_under_autocast():
    blk, tr = _stage(dtype=torch.float32)
    x = torch.randn(2, 5, 6, 6, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    convs = [m.weight for m in list(blk.modules()) + list(tr.modules()) if isinstance(m, torch.nn.Conv2d)]
    with densenet_fast.use_backend("torch"):
        recorder = _Recorder()
        with recorder, torch.autocast("cpu", dtype=torch.bfloat16):
            out = dense_stage(x, blk.stage(tr))
        assert out.dtype == torch.bfloat16
        with recorder:
            out.float().sum().backward()
    weight_casts = collections.Counter(ptr for ptr, _, to in recorder.casts if to == torch.bfloat16)
    assert {w.data_ptr(): 1 for w in convs} == {ptr: n for ptr, n in weight_casts.items()
                                                 if ptr in {w.data_ptr() for w in convs}}
    assert all(w.grad is not None and w.grad.dtype == torch.float32 for w in convs)


def test_weights_in_the_activations_dtype_are_not_cast():
    blk, tr = _stage(dtype=torch.float64)
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    recorder = _Recorder()
    with recorder:
        dense_stage(x, blk.stage(tr)).sum().backward()
    assert not recorder.casts and recorder.ops["aten.to"] == 0, recorder.casts


def _settings(modules):
    """Every BN setting a stage can mix, one per BN in turn."""
    norms = [m for m in modules.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for i, m in enumerate(norms):
        kind = i % 5
        if kind == 1:
            m.momentum = None  # cumulative average
        elif kind == 2:
            m.momentum, m.eps = 0.3, 1e-3  # its own eps: its own invstd
        elif kind == 3:
            m.momentum = None
            m.num_batches_tracked = None  # torch then leaves the running stats as they are
        elif kind == 4:
            m.eval()  # frozen: normalizes with its running stats inside a training stage
    return norms


def test_mixed_batchnorm_settings_in_one_stage_match_torchvision():
    torch.manual_seed(0)
    ours = randomize_bn(torch.nn.ModuleDict({"block": _DenseBlock(3, 5, 2, 3, 0.0),
                                             "transition": _Transition(14, 4)}).double())
    tv = torch.nn.ModuleDict({"block": torchvision.models.densenet._DenseBlock(3, 5, 2, 3, 0.0),
                              "transition": torchvision.models.densenet._Transition(14, 4)}).double()
    tv.load_state_dict(ours.state_dict())
    _settings(ours)
    _settings(tv)
    x = torch.randn(3, 5, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for step in range(3):
        results = []
        for modules in (ours, tv):
            xs = x.clone().requires_grad_(True)
            if modules is ours:
                out = dense_stage(xs, ours["block"].stage(ours["transition"]))
            else:
                out = modules["transition"](modules["block"](xs))
            g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(10 + step))
            grads = torch.autograd.grad(out, [xs] + list(modules.parameters()), g)
            results.append((out, grads))
        (out, grads), (out_tv, grads_tv) = results
        assert_close(out, out_tv, torch.float64, f"step {step} output")
        for (name, _), a, b in zip(ours.named_parameters(), grads[1:], grads_tv[1:]):
            assert_close(a, b, torch.float64, f"step {step} grad of {name}")
        assert_close(grads[0], grads_tv[0], torch.float64, f"step {step} input grad")
        tv_buffers = dict(tv.named_buffers())
        assert set(dict(ours.named_buffers())) == set(tv_buffers)
        for name, b in ours.named_buffers():
            assert_close(b.double(), tv_buffers[name].double(), torch.float64, f"step {step} buffer {name}")


def test_cumulative_average_needs_no_host_sync_and_matches_torch():
    """momentum=None over several BNs with different counts so far: one factor per BN, as tensors."""
    from densenet_fast.stage_algorithm import update_running_stats

    gen = torch.Generator().manual_seed(2)
    norms = [torch.nn.BatchNorm2d(4, momentum=m).double() for m in (None, None, 0.2)]
    twins = copy.deepcopy(norms)
    for i, (n, t) in enumerate(zip(norms, twins)):
        n.num_batches_tracked.fill_(3 * i)
        t.num_batches_tracked.fill_(3 * i)
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64, generator=gen)
    for t in twins:
        t(x)  # torch's update
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=1)
    recorder = _Recorder()
    with recorder:
        update_running_stats([(n.running_mean, n.running_var, n.num_batches_tracked) for n in norms],
                             [n.momentum for n in norms], [(mean, var)] * len(norms))
    assert "aten._local_scalar_dense" not in recorder.ops
    for n, t in zip(norms, twins):
        assert_close(n.running_mean, t.running_mean, torch.float64, "running_mean")
        assert_close(n.running_var, t.running_var, torch.float64, "running_var")
        assert int(n.num_batches_tracked) == int(t.num_batches_tracked)


@pytest.mark.parametrize("drop_rate", [0.0, 0.4])
def test_double_backward_reads_the_packed_arguments_like_torchvision(drop_rate):
    """A gradient penalty through a stage with a frozen BN and dropout: its recompute (stage_autograd)
    gets each layer's mask and each frozen BN's running stats from the op's arguments."""
    torch.manual_seed(0)
    ours = torch.nn.ModuleDict({"block": _DenseBlock(2, 4, 2, 3, drop_rate), "transition": _Transition(10, 3)})
    tv = torch.nn.ModuleDict({"block": torchvision.models.densenet._DenseBlock(2, 4, 2, 3, drop_rate),
                              "transition": torchvision.models.densenet._Transition(10, 3)})
    ours, tv = randomize_bn(ours.double()), tv.double()
    tv.load_state_dict(ours.state_dict())
    for modules in (ours, tv):
        modules["block"].denselayer2.norm2.eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = []
    for modules in (ours, tv):
        xs = x.clone().requires_grad_(True)
        torch.manual_seed(7)  # the same dropout masks
        if modules is ours:
            out = dense_stage(xs, ours["block"].stage(ours["transition"]))
        else:
            out = modules["transition"](modules["block"](xs))
        (gx,) = torch.autograd.grad((out * out).sum(), xs, create_graph=True)
        results.append(torch.autograd.grad((gx * gx).sum(), list(modules.parameters())))
    for (name, _), a, b in zip(ours.named_parameters(), *results):
        assert_close(a, b, torch.float64, f"grad of the penalty wrt {name}")
