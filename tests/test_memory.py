"""Memory is deterministic (unlike time): the block algorithm's savings are checked here, loosely.
The measured ratios against torchvision live in benchmarks/core_benchmark.py."""
import torch

import densenet_fast
from densenet_fast import reference
from densenet_fast.bench import activation_peak


def _peaks(depth):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fast = densenet_fast.densenet_bc(depth=depth, growth_rate=12)
    naive = reference.DenseNet(12, ((depth - 4) // 6,) * 3, 24, num_classes=10, small_inputs=True)
    return activation_peak(fast, x), activation_peak(naive, x)


def test_training_step_peak_is_a_fraction_of_the_naive_networks():
    fast, naive = _peaks(40)
    assert fast < 0.3 * naive, (fast, naive)


def test_peak_grows_about_linearly_with_depth():
    fast_40, naive_40 = _peaks(40)
    fast_100, naive_100 = _peaks(100)
    # 2.5x the layers: linear growth stays well under the naive network's quadratic growth.
    assert fast_100 / fast_40 < 3.2 < naive_100 / naive_40, (fast_100 / fast_40, naive_100 / naive_40)
