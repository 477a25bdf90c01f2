"""benchmarks/launch_count.py: its counting rule on known ops, and on the triton backend (under the
interpreter, as conftest.py sets it up) counted without running the kernels gives the same counts
as running them."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import densenet_fast

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from launch_count import count_step_launches


class _Views(nn.Module):
    """Views, a no-op ``to``/``contiguous`` and an allocation around two computing ops."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        y = x.view(2, 6).t().contiguous().to(torch.float32)  # .t() is a view; the copy is counted
        torch.empty(3)
        return (y.t() * self.w).sum(1)


def test_rule_counts_leaf_ops_not_views_or_allocations():
    count = count_step_launches(_Views(), torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(1)))
    names = {op.split("::", 1)[1] for op in count.ops}
    assert {"copy_", "mul"} <= names  # (sum is counted as its leaf: on CPU it zero-fills its output)
    assert not names & {"view", "t", "empty", "to", "contiguous", "expand", "as_strided", "detach"}
    assert count.triton == {} and count.host_syncs == 0


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="counts the triton backend in Triton's CPU interpreter")
def test_triton_launches_counted_alike_with_and_without_running_them():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    counts = []
    for run in (False, True):
        torch.manual_seed(0)
        model = densenet_fast.densenet_bc(depth=10, growth_rate=2, num_classes=3)
        counts.append(count_step_launches(model, x, backend="triton", warmup=False, run_kernels=run))
    assert counts[0].triton == counts[1].triton and counts[0].ops == counts[1].ops
    kernels = counts[0].triton
    # one block of one layer each: its GEMMs, forward and backward, each launched once per layer
    assert kernels["_conv3x3_fwd_kernel"] == kernels["_conv3x3_bwd_kernel"] >= 3
    assert counts[0].total == sum(counts[0].ops.values()) + sum(kernels.values())
