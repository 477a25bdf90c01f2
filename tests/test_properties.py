"""Property-based: random configurations and shapes against the naive reference, in float64."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import densenet_fast
from helpers import compare_with_reference, reference_twin


@st.composite
def configurations(draw):
    small_inputs = draw(st.booleans())
    blocks = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    config = dict(
        growth_rate=draw(st.integers(1, 6)),
        block_config=tuple(blocks),
        num_init_features=draw(st.integers(1, 8)),
        bn_size=draw(st.integers(1, 4)),
        num_classes=draw(st.integers(1, 4)),
        small_inputs=small_inputs,
        memory_efficient=draw(st.booleans()),
    )
    # The ImageNet stem divides H and W by 4 and each transition by 2: every block then sees >= 2x2.
    min_side = 2 ** len(blocks) * (1 if small_inputs else 4)
    batch = draw(st.integers(1, 3))
    h = draw(st.integers(min_side, min_side + 5))
    w = draw(st.integers(min_side, min_side + 5))
    return config, (batch, 3, h, w)


@pytest.mark.slow  # 15 random models, about 8 s on a CPU machine
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(configurations())
def test_random_configurations_match_reference(case):
    config, shape = case
    torch.manual_seed(0)
    model = densenet_fast.DenseNet(**config).double()
    ref = reference_twin(model, **config)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    compare_with_reference(model, ref, x)
