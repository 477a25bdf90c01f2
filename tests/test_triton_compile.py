"""Every Triton kernel compiles for real GPU targets (through ptxas, to a cubin) at each
specialization the model launches: float32, float16, bfloat16 autocast, NCHW and channels_last,
training and inference, odd spatial sizes, dropout, kept bottlenecks.

The other Triton tests run the kernels in the CPU interpreter, which accepts programs the GPU
compiler rejects; this one needs no GPU either (benchmarks/triton_aot.py compiles without
launching). On a CUDA machine the other tests compile and run the kernels themselves.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "triton_aot.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other Triton tests compile and run every kernel")
@pytest.mark.parametrize("arch", [90, 80], ids=["sm_90", "sm_80"])
def test_kernels_compile_for_gpu(arch):
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", str(arch)], capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert f"compiled for sm_{arch}" in summary and int(summary.split()[0]) > 100, summary
