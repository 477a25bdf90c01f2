import os

import torch

# Triton's CPU interpreter is chosen when a kernel is decorated, and some test dependencies (timm)
# import triton early: set it before anything does, where no GPU runs the real kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
