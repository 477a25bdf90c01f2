"""The tests' shared fixtures (their shared functions and data are in helpers.py)."""
import os

import pytest
import torch

# Triton's CPU interpreter is chosen when a kernel is decorated, and some test dependencies (timm)
# import triton early: set it before anything does, where no GPU runs the real kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def backend(request):
    """The test runs with densenet_fast's backend pinned (densenet_fast.use_backend) to the name it is
    parametrized with, ``indirect=True``; yields the name. A backend that is not available fails
    the test with use_backend's reason; helpers.backend_params skips the ones not built instead."""
    import densenet_fast

    with densenet_fast.use_backend(request.param):
        yield request.param


@pytest.fixture
def full_float32():
    """Full float32 for the test: cuDNN and cuBLAS (the references on a GPU) would use TF32 by default."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
