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


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other Triton tests compile and run every kernel")
def test_benchmark_kernels_keep_their_registers():
    """The launch configurations were chosen so that no kernel of the benchmark workloads spills
    registers badly on sm_90 (at 4 warps everywhere fp32 weight-gradient GEMMs spilled up to 31 KB
    per thread; now at most 504 B, a few bf16 variants). Batch 2 launches the same kernels with the same
    tile configurations as batch 64; only some integer specializations differ."""
    result = subprocess.run([sys.executable, str(SCRIPT), "--set", "bench", "--batch", "2", "--resources",
                             "--max-spill", "1024"], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
    assert "variants spill registers" in result.stdout
