"""The op suite's table of where each backend computes (helpers.RUNS_ON) agrees with the backends'
supports() on this machine, so the suite neither generates a case that runs nowhere nor misses one."""
import pytest
import torch

import densenet_fast
from densenet_fast.ops import backend_named
from helpers import ALL_DTYPES, OP_BACKENDS, RUNS_ON


@pytest.mark.parametrize("name", OP_BACKENDS)
def test_runs_on_matches_supports(name):
    if name not in densenet_fast.available_backends():
        pytest.skip(f"backend {name!r} is not available here")
    backend = backend_named(name)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for dtype in ALL_DTYPES:
            if backend.supports(torch.empty(0, device=device, dtype=dtype)) is None:
                assert dtype in RUNS_ON[name].get(device, ()), f"{name} computes on {device} {dtype}: add it to RUNS_ON"
