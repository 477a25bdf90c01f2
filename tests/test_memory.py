"""Memory is deterministic (unlike time): the block algorithm's savings are checked here, loosely.
The measured ratios against torchvision live in benchmarks/core_benchmark.py."""
import pytest
import torch

import densenet_fast
from densenet_fast import reference
from densenet_fast.memory import activation_peak
from densenet_fast.models import _DenseBlock, _Transition
from densenet_fast.stage import dense_stage


def _peaks(depth):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fast = densenet_fast.densenet_bc(depth=depth, growth_rate=12)
    naive = reference.DenseNet(12, ((depth - 4) // 6,) * 3, 24, num_classes=10, small_inputs=True)
    return activation_peak(fast, x), activation_peak(naive, x)


@pytest.mark.slow
def test_training_step_peak_is_a_fraction_of_the_naive_networks():
    fast, naive = _peaks(40)
    assert fast < 0.3 * naive, (fast, naive)


@pytest.mark.slow
def test_peak_grows_about_linearly_with_depth():
    fast_40, naive_40 = _peaks(40)
    fast_100, naive_100 = _peaks(100)
    # 2.5x the layers: linear growth stays well under the naive network's quadratic growth.
    assert fast_100 / fast_40 < 3.2 < naive_100 / naive_40, (fast_100 / fast_40, naive_100 / naive_40)


@pytest.mark.parametrize("transition", [True, False])
def test_a_stage_keeps_its_input_only_as_its_buffers_first_channels(transition):
    """The input is saved for a double backward, but its storage is not kept: what the node
    gives back for it is a view of the kept buffer (or block output), in the input's place in the graph."""
    torch.manual_seed(0)
    block = _DenseBlock(2, 4, 2, 3, 0.0).double()
    stage = block.stage(_Transition(10, 3).double() if transition else None)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1),
                    requires_grad=True) * 1.5
    out = dense_stage(x, stage)
    saved = out.grad_fn.saved_tensors
    kept, x_saved = saved[0], saved[-1]
    assert x_saved.untyped_storage().data_ptr() == kept.untyped_storage().data_ptr()
    assert x_saved.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    assert torch.equal(x_saved, x) and x_saved.grad_fn is x.grad_fn


def test_a_stage_call_leaves_no_reference_cycle():
    """The saved-tensor hooks of a stage call are freed with its graph, not left to the cyclic GC:
    with the collector off, the number alive does not grow with the steps."""
    import gc

    from densenet_fast.stage import _InputAsBufferPrefix

    torch.manual_seed(0)
    stage = _DenseBlock(2, 4, 2, 3, 0.0).double().stage(_Transition(10, 3).double())
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    alive = []
    gc.collect()
    gc.disable()
    try:
        for steps in (2, 5):
            for _ in range(steps):
                dense_stage(x * 1.0, stage).sum().backward()
            alive.append(sum(type(o) is _InputAsBufferPrefix for o in gc.get_objects()))
    finally:
        gc.enable()
    assert alive[1] == alive[0] <= 1, f"hook objects alive after 2 and 7 steps: {alive}"
