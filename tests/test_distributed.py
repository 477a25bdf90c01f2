"""Multi-process training on torch.distributed (2 processes, gloo).

torch.nn.SyncBatchNorm refuses CPU tensors, so on CPU synchronized BN is checked against what it
is defined to compute: BN over the batch of all processes together, i.e. the naive reference run
on the concatenated batch (outputs, running stats, and the sum of the processes' gradients). With
CUDA, both processes share the GPU and it is also checked against torch.nn.SyncBatchNorm itself
on a torchvision model (that case runs in tools/gpu_check).
"""

import copy
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision

import densenet_fast
from helpers import randomize_bn, reference_twin

CONFIG = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3)
SHARDS = (2, 3)  # unequal batches: statistics must be weighted by counts


def _data():
    x = torch.randn(sum(SHARDS), 3, 24, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return x, torch.split(x, SHARDS)


def _models():
    torch.manual_seed(0)
    model = randomize_bn(densenet_fast.DenseNet(**CONFIG).double(), running_stats=False)
    return model, reference_twin(model, **CONFIG)


def _run(rank, world, init_file, check):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        check(rank)
    finally:
        dist.destroy_process_group()


def _check_ddp(rank):
    model, ref = _models()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    _, shards = _data()
    ddp(shards[rank]).sum().backward()
    ref(shards[rank]).sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        expected = q.grad.clone()
        dist.all_reduce(expected)  # DDP averages the replicas' gradients
        torch.testing.assert_close(p.grad, expected / dist.get_world_size(), msg=name)


def _check_sync_batchnorm(rank):
    model, ref = _models()
    densenet_fast.convert_sync_batchnorm(model)
    assert isinstance(model.features.norm0, densenet_fast.SyncBatchNorm2d)
    x, shards = _data()
    for step in range(2):
        out = model(shards[rank])
        out.sum().backward()
        out_ref = ref(x)
        out_ref.sum().backward()
        torch.testing.assert_close(out, torch.split(out_ref.detach(), SHARDS)[rank], msg=f"step {step} output")
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            total = p.grad.clone()
            dist.all_reduce(total)  # parameter grads are local, as with torch.nn.SyncBatchNorm
            torch.testing.assert_close(total, q.grad, msg=f"step {step} grad of {name}")
        model.zero_grad()
        ref.zero_grad()
    for (name, b), c in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, msg=name)
    # Input gradients: every process gets its rows of the full-batch gradient.
    xs = shards[rank].clone().requires_grad_(True)
    model(xs).sum().backward()
    xr = x.clone().requires_grad_(True)
    ref(xr).sum().backward()
    torch.testing.assert_close(xs.grad, torch.split(xr.grad, SHARDS)[rank])


def _check_against_torch_sync_batchnorm(rank):
    """Ours after convert_sync_batchnorm against torchvision after torch's convert_sync_batchnorm,
    both on CUDA in full float32: outputs, input grads, parameter grads, running stats."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    model, _ = _models()
    tv = torchvision.models.DenseNet(**CONFIG)
    tv.load_state_dict(model.state_dict())
    model = densenet_fast.convert_sync_batchnorm(model.float().cuda())
    tv = torch.nn.SyncBatchNorm.convert_sync_batchnorm(tv.cuda())
    _, shards = _data()
    x = shards[rank].float().cuda()
    for step in range(2):
        xs, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out, out_tv = model(xs), tv(xt)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(10 + step)).cuda()
        out.backward(g)
        out_tv.backward(g)
        torch.testing.assert_close(out, out_tv, atol=2e-4, rtol=2e-3, msg=lambda m: f"step {step} output: {m}")
        torch.testing.assert_close(xs.grad, xt.grad, atol=2e-4, rtol=2e-3, msg=lambda m: f"step {step} input grad: {m}")
        for (name, p), q in zip(model.named_parameters(), tv.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=2e-4, rtol=2e-3, msg=lambda m: f"step {step} {name}: {m}")
        model.zero_grad()
        tv.zero_grad()
    for (name, b), c in zip(model.named_buffers(), tv.buffers()):
        torch.testing.assert_close(b, c, atol=2e-4, rtol=2e-3, msg=lambda m: f"{name}: {m}")


def _check_torch_sync_batchnorm_inside_a_stage(rank):
    """Blocks whose BNs torch.nn.SyncBatchNorm.convert_sync_batchnorm replaced run fused with statistics
    over every process (torch's own module refuses CPU tensors when it synchronizes, so the check is
    its definition: BN over the concatenated batch, with the processes' gradients summed)."""
    model, _ = _models()
    block, transition = model.features.denseblock1, model.features.transition1
    full = densenet_fast.models._Features(OrderedDict(block=block, transition=transition))  # fused as one node
    reference = copy.deepcopy(full)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(full))
    assert type(synced.block.denselayer1.norm1) is torch.nn.SyncBatchNorm
    x = torch.randn(sum(SHARDS), 8, 12, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    xs = torch.split(x, SHARDS)[rank].clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused op runs: no fallback warning
        out = synced(xs)
    out_ref = reference(xr)
    g = torch.randn(out_ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out.backward(torch.split(g, SHARDS)[rank])
    out_ref.backward(g)
    torch.testing.assert_close(out, torch.split(out_ref.detach(), SHARDS)[rank], msg="output")
    torch.testing.assert_close(xs.grad, torch.split(xr.grad, SHARDS)[rank], msg="input grad")
    for (name, p), q in zip(synced.named_parameters(), reference.parameters()):
        total = p.grad.clone()
        dist.all_reduce(total)
        torch.testing.assert_close(total, q.grad, msg=name)
    for (name, b), c in zip(synced.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, msg=name)


def _check_double_backward_through_sync_refuses(rank):
    """torch.nn.SyncBatchNorm's backward is not differentiable (batch_norm_backward_reduce has no
    derivative); ours says so in one error instead of returning gradients of local statistics."""
    model, _ = _models()
    densenet_fast.convert_sync_batchnorm(model)
    _, shards = _data()
    x = shards[rank].clone().requires_grad_(True)
    out = model(x)
    with pytest.raises(NotImplementedError, match="double backward through .* synchronized BatchNorm"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.nn.SyncBatchNorm needs CUDA (runs in gpu_check)")
def test_sync_batchnorm_matches_torch_sync_batchnorm_on_cuda(tmp_path):
    mp.spawn(_run, args=(2, str(tmp_path / "init"), _check_against_torch_sync_batchnorm), nprocs=2, join=True)


@pytest.mark.slow
@pytest.mark.parametrize("check", [_check_ddp, _check_sync_batchnorm, _check_torch_sync_batchnorm_inside_a_stage,
                                   _check_double_backward_through_sync_refuses],
                         ids=["ddp", "sync_batchnorm", "torch_sync_batchnorm_in_a_stage", "sync_double_backward"])
def test_two_processes_on_gloo(check, tmp_path):
    if not dist.is_available():
        pytest.fail("torch.distributed is not available in this build")
    mp.spawn(_run, args=(2, str(tmp_path / "init"), check), nprocs=2, join=True)


def test_convert_sync_batchnorm_keeps_modules_and_parameters():
    model, _ = _models()
    norm0, weight = model.features.norm0, model.features.norm0.weight
    densenet_fast.convert_sync_batchnorm(model)
    assert model.features.norm0 is norm0 and model.features.norm0.weight is weight
    assert isinstance(norm0, densenet_fast.SyncBatchNorm2d) and model.features.denseblock1.sync_batchnorm
    assert type(model.features.denseblock1.denselayer1.norm1) is torch.nn.BatchNorm2d
    # Without a process group it is plain BN.
    x = torch.randn(2, 3, 24, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model.eval()(x), _models()[0].eval()(x))
