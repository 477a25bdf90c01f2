"""Every Triton kernel compiles for real GPU targets (through ptxas, to a cubin) at each
specialization the model launches: float32, float16, bfloat16 autocast, NCHW and channels_last,
training and inference, odd spatial sizes, dropout, kept bottlenecks.

The other Triton tests run the kernels in the CPU interpreter, which accepts programs the GPU
compiler rejects; this one needs no GPU either (tools/triton_aot.py compiles without
launching). On a CUDA machine the other tests compile and run the kernels themselves.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "triton_aot.py"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other Triton tests compile and run every kernel")
@pytest.mark.parametrize("arch", [90, 80], ids=["sm_90", "sm_80"])
def test_kernels_compile_for_gpu(arch):
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", str(arch)], capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert f"compiled for sm_{arch}" in summary and int(summary.split()[0]) > 100, summary


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other Triton tests compile and run every kernel")
def test_benchmark_kernels_keep_their_registers_and_matrix_units():
    """The launch configurations were chosen so that no kernel of the benchmark workloads spills
    registers badly on sm_90 (at 4 warps everywhere fp32 weight-gradient GEMMs spilled up to 31 KB
    per thread), and their SASS keeps what the kernels were shaped for (triton_aot.SASS_RULES):
    every half-precision GEMM on wgmma (the conv3x3 weight gradient was on mma.sync), the conv1x1
    GEMMs over aligned rows software-pipelined (cp.async, a wgmma in flight). Batch 2 launches the
    same GEMM kernels with the same tile configurations as batch 64 (GEMM tiles depend on the maps,
    not the batch); some integer specializations and the statistics finalize's tiles differ."""
    result = subprocess.run([sys.executable, str(SCRIPT), "--set", "bench", "--batch", "2", "--resources",
                             "--max-spill", "1024", "--check-sass"], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
    assert "variants spill registers" in result.stdout
    assert re.search(r"SASS rules: [12] checked, 0 variant\(s\) break one", result.stdout)  # 1 under Triton 3.6


def test_sass_facts_find_the_hot_loop():
    """tools/sass_facts.py on a hand-written SASS listing: the innermost loop holding the
    matrix instructions, its async copies, wgmma wait depth and narrow loads."""
    sys.path.insert(0, str(SCRIPT.parent))
    from sass_facts import facts

    sass = """
        /*0000*/                   LDG.E.U16 R2, desc[UR4][R4.64] ;
        /*0010*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R6.64] ;
        /*0020*/                   HGMMA.64x64x16.F32 R24, R64, gdesc[UR4], R24, gsb0 ;
        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0040*/                   LDG.E.U16 R8, desc[UR4][R4.64] ;
        /*0050*/              @!P0 BRA 0x10 ;
        /*0060*/                   STL [R1], R9 ;
        /*0070*/                   EXIT ;
    """
    f = facts(sass)
    assert (f.mma, f.async_copy, f.wgmma_wait, f.narrow_loads, f.local_memory) == ("wgmma", "cp.async", 1, 1, 1)
    serial = facts(sass.replace("HGMMA.64x64x16.F32", "HMMA.16816.F32").replace("LDGSTS.E.BYPASS.128", "LDG.E.128"))
    assert (serial.mma, serial.async_copy, serial.wgmma_wait) == ("mma.sync", "-", 1)


def test_sass_facts_report_the_worst_hot_loop_of_a_two_job_kernel():
    """A kernel running two jobs in one launch (a backward's data and weight GEMMs) has a hot loop
    per job: a serialized or register-fed one is reported even when the other is pipelined."""
    sys.path.insert(0, str(SCRIPT.parent))
    from sass_facts import facts

    sass = """
        /*0000*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R6.64] ;
        /*0010*/                   HGMMA.64x64x16.F32 R24, R64, gdesc[UR4], R24, gsb0 ;
        /*0020*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0030*/              @!P0 BRA 0x0 ;
        /*0040*/                   LDG.E.U16 R8, desc[UR4][R4.64] ;
        /*0050*/                   HGMMA.64x64x16.F32 R24, R64, gdesc[UR4], R24, gsb0 ;
        /*0060*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0070*/              @!P1 BRA 0x40 ;
        /*0080*/                   EXIT ;
    """
    f = facts(sass)
    assert (f.mma, f.async_copy, f.wgmma_wait, f.narrow_loads) == ("wgmma", "-", 0, 1)
    pipelined = facts(sass.replace("LDG.E.U16", "LDGSTS.E.BYPASS.128").replace("gsb0, 0x0", "gsb0, 0x1"))
    assert (pipelined.async_copy, pipelined.wgmma_wait, pipelined.narrow_loads) == ("cp.async", 1, 0)
    mixed = facts(sass.replace("HGMMA.64x64x16.F32 R24, R64, gdesc[UR4], R24, gsb0 ;\n        /*0060*/",
                               "HMMA.16816.F32 R24, R64, R8, R24 ;\n        /*0060*/"))
    assert mixed.mma == "mma.sync"
