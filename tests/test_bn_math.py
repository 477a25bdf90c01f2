"""densenet_fast.bn_math against torch's own BatchNorm: the running-stats update (torch.nn.BatchNorm2d,
torch.nn.functional.batch_norm), the coefficients (F.batch_norm's output and gradients) and Chan's
merge (the statistics of the concatenated data), on seeded random inputs with non-zero means."""
import ast
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

from densenet_fast import bn_math
from helpers import TOLERANCES

DTYPES = [torch.float32, torch.float64]
TOL = {dtype: dict(zip(("atol", "rtol"), TOLERANCES["stats"][dtype])) for dtype in DTYPES}


def _batch(gen, dtype, n=4, c=5, h=3, w=2):
    """Per-channel offsets and spreads, so no channel has mean 0 or variance 1."""
    offset = torch.randn(c, 1, 1, generator=gen, dtype=torch.float64) * 4
    spread = torch.rand(c, 1, 1, generator=gen, dtype=torch.float64) * 3 + 0.5
    return (torch.randn(n, c, h, w, generator=gen, dtype=torch.float64) * spread + offset).to(dtype)


def _stats(x, correction):
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=correction)
    return mean, var


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_running_stats_follow_batchnorm2d(momentum, dtype):
    gen = torch.Generator().manual_seed(0)
    norm = torch.nn.BatchNorm2d(5, momentum=momentum).to(dtype).train()
    running = [b.clone() for b in (norm.running_mean, norm.running_var, norm.num_batches_tracked)]
    for step in range(6):
        x = _batch(gen, dtype)
        norm(x)
        bn_math.update_running_stats([tuple(running)], [momentum], [_stats(x, correction=1)])
        torch.testing.assert_close(running[0], norm.running_mean, **TOL[dtype], msg=f"step {step} running_mean")
        torch.testing.assert_close(running[1], norm.running_var, **TOL[dtype], msg=f"step {step} running_var")
        assert running[2].dtype == torch.long and int(running[2]) == int(norm.num_batches_tracked) == step + 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_call_updates_bns_of_every_momentum_like_batch_norm(dtype):
    """Several BNs per call (grouped by momentum), cumulative ones with different counts so far, and
    one without num_batches_tracked (momentum None is then F.batch_norm's factor 0)."""
    gen = torch.Generator().manual_seed(1)
    momenta = [0.1, 0.3, None, 0.1, None]
    norms = [torch.nn.BatchNorm2d(5, momentum=m).to(dtype) for m in momenta]
    for i, norm in enumerate(norms):
        norm.num_batches_tracked.fill_(2 * i)
        with torch.no_grad():
            norm.running_mean.uniform_(-1, 1, generator=gen)
            norm.running_var.uniform_(0.5, 2, generator=gen)
    ours = copy.deepcopy(norms)
    untracked = [norms[0].running_mean.clone(), norms[0].running_var.clone()]
    theirs_untracked = [t.clone() for t in untracked]
    for _ in range(4):
        xs = [_batch(gen, dtype) for _ in norms]
        for norm, x in zip(norms, xs):
            norm(x)
        F.batch_norm(xs[0], *theirs_untracked, training=True, momentum=0.0)
        running = [(n.running_mean, n.running_var, n.num_batches_tracked) for n in ours] + [(*untracked, None)]
        bn_math.update_running_stats(running, momenta + [None], [_stats(x, correction=1) for x in xs + xs[:1]])
    for i, (a, b) in enumerate(zip(ours, norms)):
        torch.testing.assert_close(a.running_mean, b.running_mean, **TOL[dtype], msg=f"BN {i} running_mean")
        torch.testing.assert_close(a.running_var, b.running_var, **TOL[dtype], msg=f"BN {i} running_var")
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked)
    torch.testing.assert_close(untracked, theirs_untracked, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_coefficients_normalize_like_batch_norm(dtype, affine):
    """x * scale + shift is F.batch_norm's output, gradients included (SyncBatchNorm2d's use);
    written into a (2, C) block they are the same numbers, to the bit."""
    gen = torch.Generator().manual_seed(2)
    eps = 1e-3
    x = _batch(gen, dtype).requires_grad_()
    weight = (torch.rand(5, generator=gen, dtype=dtype) + 0.5).requires_grad_() if affine else None
    bias = torch.randn(5, generator=gen, dtype=dtype).requires_grad_() if affine else None
    mean, var = _stats(x, correction=0)
    scale, shift = bn_math.coefficients(mean, bn_math.rsqrt_eps(var, eps), weight, bias)
    ours = x * scale[:, None, None] + shift[:, None, None]
    theirs = F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
    torch.testing.assert_close(ours, theirs, **TOL[dtype])
    grad = torch.randn(ours.shape, generator=gen, dtype=dtype)
    inputs = [t for t in (x, weight, bias) if t is not None]
    for a, b in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(theirs, inputs, grad)):
        torch.testing.assert_close(a, b, **TOL[dtype])

    with torch.no_grad():
        invstd = torch.empty_like(var)
        bn_math.rsqrt_eps(var, eps, invstd)
        packed = torch.full((3 + 2 * 5,), float("nan"), dtype=dtype)
        bn_math.coefficients(mean, invstd, weight, bias, packed[3:].view(2, 5))
    torch.testing.assert_close(packed[3:].view(2, 5), torch.stack([scale, shift]).detach(), atol=0, rtol=0)
    assert packed[:3].isnan().all()


def test_rsqrt_eps_rounds_the_variance_to_the_output_dtype_first():
    var = torch.rand(7, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.1
    out = torch.empty(7, dtype=torch.float32)
    assert bn_math.rsqrt_eps(var, 1e-5, out) is out
    torch.testing.assert_close(out, torch.rsqrt(var.float() + 1e-5), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chan_merge_gives_the_statistics_of_the_concatenated_data(dtype):
    """Unequal parts around a large mean (a sum of squares would cancel there)."""
    gen = torch.Generator().manual_seed(4)
    parts = [_batch(gen, torch.float64, n=n) + 100.0 for n in (2, 3, 1, 5)]
    exact_mean, exact_var = _stats(torch.cat(parts), correction=0)
    stats = [_stats(p.to(dtype), correction=0) for p in parts]
    means, variances = torch.stack([m for m, _ in stats]), torch.stack([v for _, v in stats])
    for counts_dtype in (torch.float64, dtype):  # stage_sync.py's counts, SyncBatchNorm2d's
        counts = torch.tensor([p[:, 0].numel() for p in parts], dtype=counts_dtype)
        mean, var = bn_math.chan_merge(counts, means, variances)
        assert mean.dtype == var.dtype == dtype
        torch.testing.assert_close(mean.double(), exact_mean, **TOL[dtype])
        torch.testing.assert_close(var.double(), exact_var, **TOL[dtype])
        again = bn_math.chan_merge(counts, means, variances, counts.sum())
        torch.testing.assert_close(again, (mean, var), atol=0, rtol=0)


def test_imports_only_torch():
    """Any layer of the package (the op interface, kernels' code) may import bn_math."""
    tree = ast.parse(inspect.getsource(bn_math))
    modules = [n.module if isinstance(n, ast.ImportFrom) else a.name
               for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
               for a in (n.names if isinstance(n, ast.Import) else [None])]
    assert all(not (isinstance(n, ast.ImportFrom) and n.level) for n in ast.walk(tree))
    assert {m.split(".")[0] for m in modules} <= {"__future__", "collections", "typing", "torch"}, modules
