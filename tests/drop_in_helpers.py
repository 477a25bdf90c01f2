"""Shared checks of the drop-in contract (issue 10): ours against torchvision with the same weights and the
same modification, and whether the fused op ran or the stage fell back to its modules."""
from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable
from typing import Optional

import pytest
import torch
import torchvision
from torch import nn

import densenet_fast
from helpers import randomize_bn

# Tiny models: every case compares module-by-module torchvision with ours in float64. memory_efficient is
# torchvision's default (False) on both sides: with True, torchvision's checkpointing updates running stats
# twice per step, which our fused op deliberately does not (its fallback does, see test_drop_in_modules.py).
CONFIG = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5, memory_efficient=False)
CONFIG3 = dict(growth_rate=6, block_config=(2, 3, 2), num_init_features=12, bn_size=2, num_classes=5,
               memory_efficient=False)
FUSED_OP = "densenet_fast::dense_stage"


def seeded(shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def tiny_input(config: dict = CONFIG, batch: int = 3, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    # The default stem divides by 4 and each transition by 2: 16x12 leaves every transition 2x2 or more
    # with one transition, 32x24 with two.
    size = (16, 12) if len(config["block_config"]) <= 2 else (32, 24)
    return seeded((batch, 3, *size), seed, dtype)


def torchvision_twin(modify: Optional[Callable[[nn.Module], None]] = None, config: dict = CONFIG, seed: int = 0,
                     dtype=torch.float64) -> tuple[nn.Module, nn.Module]:
    """(torchvision's DenseNet, ours) with the same weights and running stats (BN ones randomized so no BN
    is the identity) and the same ``modify`` applied to both before the state is copied."""
    torch.manual_seed(seed)
    tv = randomize_bn(torchvision.models.DenseNet(**config))
    ours = densenet_fast.DenseNet(**config)
    if modify is not None:
        modify(tv)
        modify(ours)
    tv, ours = tv.to(dtype), ours.to(dtype)
    ours.load_state_dict(tv.state_dict(), strict=True)
    theirs = dict(tv.named_modules())
    for name, module in ours.named_modules():
        module.training = theirs[name].training
    return tv, ours


def train_step(model, x):
    """One forward and backward of a loss that reaches every output; returns the input's gradient."""
    x = x.clone().requires_grad_(True)
    model(x).pow(2).sum().backward()
    return x.grad


@contextlib.contextmanager
def fallback_policy(policy: Optional[str]):
    densenet_fast.set_fallback(policy)
    try:
        yield
    finally:
        densenet_fast.set_fallback(None)


@contextlib.contextmanager
def library_warnings():
    """Records densenet_fast's warnings raised in the block (after forgetting the reasons already warned)."""
    densenet_fast.reset_fallback_warnings()  # warned once per reason per process: see it whatever ran before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours: list = []
        yield ours
    ours += [w for w in caught if "densenet_fast" in str(w.message)]


def fused_calls(run: Callable[[], object]) -> int:
    """How many times ``run`` called the fused stage op (profiler events: no dispatch mode that could change
    what the library decides)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    return sum(e.count for e in prof.key_averages() if e.key == FUSED_OP)


def assert_fused(run: Callable[[], object], stages: int) -> None:
    """``run`` keeps the fused op (``stages`` calls: a block and its transition are one) and warns nothing."""
    with library_warnings() as caught:
        calls = fused_calls(run)
    assert not caught, f"unexpected fallback: {[str(w.message) for w in caught]}"
    assert calls == stages, f"expected {stages} fused stage calls, got {calls}"


def assert_declines(run: Callable[[], object], reason: str) -> None:
    """The fused path declines ``run`` for ``reason`` (a regex): with set_fallback('error') one FallbackError
    (a RuntimeError) naming it; by default a UserWarning naming it, and the modules run."""
    assert issubclass(densenet_fast.FallbackError, RuntimeError)
    with fallback_policy("error"), pytest.raises(densenet_fast.FallbackError) as err:
        run()
    assert "densenet_fast" in str(err.value) and re.search(reason, str(err.value)), str(err.value)
    with library_warnings() as caught:
        run()
    assert any(issubclass(w.category, UserWarning) and re.search(reason, str(w.message)) for w in caught), \
        f"no fallback warning matching {reason!r}: {[str(w.message) for w in caught]}"


def assert_same_tensors(actual, expected, what: str, dtype=torch.float64) -> None:
    """Lists (or dicts) of tensors equal at the dtype's tolerance, in the same order and number."""
    from helpers import assert_close

    if isinstance(expected, dict):
        assert list(actual) == list(expected), what
        actual, expected = list(actual.values()), list(expected.values())
    assert len(actual) == len(expected), f"{what}: {len(actual)} values, torchvision {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, dtype, f"{what} [{i}]")
