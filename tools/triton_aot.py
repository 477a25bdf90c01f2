"""Compile every Triton kernel the model launches for a real GPU target, on a machine without a GPU.

The tests run the kernels in Triton's CPU interpreter, which accepts programs the GPU compiler
rejects (tl.dot shapes and operand dtypes, layouts, register pressure, bf16). This script drives
training and inference steps of real models with the ``triton`` backend on CPU tensors, but with
the kernels compiled rather than interpreted: a stand-in driver reports a CUDA target (sm_90, the
H200, by default) and every launch is turned into Triton's ``warmup`` (compile, don't run). So each
kernel is compiled through ptxas to a cubin at exactly the specializations (dtypes, constexprs,
integer and alignment specializations) the model produces, and nothing is executed: the numbers
the steps compute are meaningless and unused.

It prints one line per compiled variant and a summary (variants and seconds per kernel), and exits
with 1, naming the kernel and its signature, if any variant fails to compile (or, with
``--max-spill``, spills more registers than allowed; with ``--check-sass``, breaks a rule of
SASS_RULES below). Compile time here is CPU time, so the summary also says what the first GPU run
pays for compilation.

    python tools/triton_aot.py                       # sm_90; small nets in every mode (CI)
    python tools/triton_aot.py --arch 80             # sm_80 (A100)
    python tools/triton_aot.py --set bench --jobs 4  # gpu_check's benchmark workloads, 4 processes
    python tools/triton_aot.py --set bench --resources  # + registers, spills and SASS facts per variant
    python tools/triton_aot.py --set bench --batch 2 --resources --max-spill 1024 --check-sass  # CI

Compiled kernels land in Triton's on-disk cache (~/.triton/cache, or TRITON_CACHE_DIR), keyed by
source, target and specialization, not by how they were compiled. So ``tools/gpu_check`` runs
``--set bench`` in the background on the GPU machine's spare cores: the benchmarks' warm-up steps
then find most kernels compiled (a key that differs, say by a pointer's alignment, only costs a
compile there, as it would have anyway).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

# Kernels are compiled (not interpreted) only if TRITON_INTERPRET is off when they are decorated.
os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import densenet_fast
from densenet_fast.ops import register_backend
from densenet_fast.ops.interface import Unsupported
from densenet_fast.ops.triton import SUPPORTED_DTYPES
from densenet_fast.ops.triton_backend import TritonBackend
from sass_facts import SassFacts, kernel_facts


class TargetOnlyDriver:
    """The part of Triton's driver that compiling needs: a target, a device index and a stream."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


class CompileOnlyTritonBackend(TritonBackend):
    """The triton backend, serving CPU tensors (its kernels are compiled, never launched)."""

    name = "triton"

    def __init__(self) -> None:  # no CUDA device needed: nothing runs on one
        pass

    def supports(self, x) -> Optional[Unsupported]:
        if x.dtype not in SUPPORTED_DTYPES:
            return Unsupported(f"backend 'triton' computes on float32, float16 and bfloat16 tensors, got {x.dtype}",
                               TypeError)
        return None


compiled: list[tuple[str, str, float]] = []  # (kernel, specialization, seconds)
failures: list[tuple[str, str, str]] = []
# (kernel, specialization, registers, spill bytes, shared bytes, SassFacts)
resources: list[tuple[str, str, int, int, int, SassFacts]] = []


def ptxas_resources(kernel, arch: int) -> tuple[int, int]:
    """(registers per thread, bytes spilled: stores + loads) of a compiled kernel, from ``ptxas -v``
    run on its PTX as Triton runs it (Triton keeps the cubin, not ptxas's report)."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(kernel.asm["ptx"])
        report = subprocess.run([knobs.nvidia.ptxas.path, "-v", "--regAllocOptLevel=2",
                                 f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}", str(ptx), "-o",
                                 str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return registers, int(spills.group(1)) + int(spills.group(2))


def install(arch: int, with_resources: bool = False) -> None:
    """From now on in this process, Triton launches compile for ``sm_<arch>`` and record each
    variant (and its ptxas resources), and backend "triton" serves CPU tensors."""
    driver.set_active(TargetOnlyDriver(arch))
    run = JITFunction.run

    def compile_only_run(self, *args, grid, warmup, **kwargs):
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    do_compile = JITFunction._do_compile

    def timed_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        spec = ", ".join(f"{k}={v}" for k, v in signature.items() if v != "constexpr")
        consts = ", ".join(f"{self.params[k[0]].name if len(k) == 1 else k}={v}" for k, v in constexprs.items())
        # Integer arguments specialized as multiples of 16 (what lets masks and loads vectorize).
        div16 = [self.params[k[0]].name for k, v in attrs.items()
                 if len(k) == 1 and ["tt.divisibility", 16] in v
                 and not str(signature.get(self.params[k[0]].name)).startswith("*")]
        label = f"{spec} | {consts} | %16: {' '.join(div16) or '-'} | num_warps={options.num_warps}"
        start = time.perf_counter()
        try:
            kernel = do_compile(self, key, signature, device, constexprs, options, attrs, warmup)
        except Exception as err:  # report every failure, not just the first
            failures.append((self.__name__, label, f"{type(err).__name__}: {err}"))
            print(f"FAILED  {self.__name__}  {label}\n        {type(err).__name__}: {str(err)[:2000]}", flush=True)
            raise
        seconds = time.perf_counter() - start
        compiled.append((self.__name__, label, seconds))
        usage = ""
        if with_resources:
            registers, spilled = ptxas_resources(kernel, arch)
            sass = kernel_facts(kernel)
            resources.append((self.__name__, label, registers, spilled, kernel.metadata.shared, sass))
            usage = (f"  [{registers} registers, {spilled} B spilled, {kernel.metadata.shared} B shared; "
                     f"hot loop: {sass.describe()}]")
        print(f"{seconds:6.2f} s  {self.__name__}  {label}{usage}", flush=True)
        return kernel

    JITFunction.run = compile_only_run
    JITFunction._do_compile = timed_compile
    register_backend("triton", CompileOnlyTritonBackend)
    densenet_fast.set_backend("triton")


HALF = ("fp16", "bf16")
PIPELINED = ("_conv1x1_fwd_kernel", "_conv1x1_bwd_kernel")


def constexprs(label: str) -> dict[str, str]:
    """The specialization part of a variant's label (constexprs and specialized integers)."""
    return dict(item.split("=", 1) for item in label.split(" | ")[1].split(", ") if "=" in item)


def divisible_by_16(label: str) -> set[str]:
    """The integer arguments a variant was specialized for as multiples of 16."""
    return set(label.split(" | %16: ")[1].split(" | ")[0].split())


def aligned_rows(consts: dict[str, str]) -> bool:
    """Whether every pixel-row alignment of a variant (see common.row_align) allows full vectors."""
    aligns = [int(v) for k, v in consts.items() if k.endswith("ALIGN")]
    return bool(aligns) and min(aligns) >= 8


# What --check-sass requires of the sm_90 variants: (rule, the variants it covers, the check).
# The pipelining rule covers what DenseNet-121 runs in NCHW: channel counts that are multiples of
# 16 (of 32 there) and maps whose pixel rows align (all but 7x7). The variants it leaves out load
# narrow, masked tiles (odd channel counts such as DenseNet-BC k=12's; 7x7 images; the pooled
# transition's strided input) and are not pipelined; the conv3x3 kernels' tap masks vary per row.
# It holds from Triton 3.8: Triton 3.6's PTX for the conv1x1 forward without statistics (the
# backward's recompute) gets its wgmma serialized by ptxas (C7515, "non wgmma instructions defining
# accumulator registers"), whatever the warps or the K step; with 3.6 the rule is reported, not enforced.
PIPELINE_RULE_FROM = (3, 8)
SASS_RULES = [
    ("half-precision GEMMs run their hot loop on wgmma",
     lambda kernel, dtype, label: kernel.startswith("_conv") and dtype in HALF,
     lambda f: f.mma == "wgmma"),
    ("conv1x1 GEMMs over aligned rows and channels are software-pipelined: cp.async loads, a wgmma in flight",
     lambda kernel, dtype, label: kernel in PIPELINED and dtype in HALF and constexprs(label).get("POOL") == "False"
     and aligned_rows(constexprs(label)) and {"C_in", "C_out"} <= divisible_by_16(label),
     lambda f: f.async_copy == "cp.async" and f.wgmma_wait >= 1),
]


def enforced_rules() -> list:
    """The SASS_RULES this Triton version is held to."""
    return SASS_RULES if tuple(map(int, triton.__version__.split(".")[:2])) >= PIPELINE_RULE_FROM else SASS_RULES[:1]


def sass_violations(rows, arch: int) -> list[str]:
    """The variants that break an enforced rule of SASS_RULES (rules for sm_90; other targets: none)."""
    if arch != 90:
        return []
    rules = enforced_rules()
    broken = []
    for kernel, label, _, _, _, sass in rows:
        dtype = variant_dtype(label)
        for rule, covers, holds in rules:
            if covers(kernel, dtype, label) and not holds(sass):
                broken.append(f"{rule}: {kernel} [{sass.describe()}]  {label}")
    return broken


def variant_dtype(label: str) -> str:
    """The element type of a variant's first pointer argument (its activations): fp32, fp16, bf16."""
    match = re.search(r"=\*(\w+)", label)
    return match.group(1) if match else "?"


def print_sass_summary(rows) -> None:
    """Per kernel and activation dtype: what the variants' hot loops do (see sass_facts.py)."""
    groups = defaultdict(list)
    for kernel, label, _, spilled, _, sass in rows:
        groups[(kernel, variant_dtype(label))].append((spilled, sass))
    print(f"\n{'kernel':<34} {'dtype':<5} {'n':>3}  {'matrix unit':<24} {'async copies':<22} "
          f"{'max wait':>8} {'narrow':>6} {'spill':>6}")
    for (kernel, dtype), items in sorted(groups.items()):
        def tally(values):
            counts = defaultdict(int)
            for v in values:
                counts[v] += 1
            return " ".join(f"{k}:{n}" for k, n in sorted(counts.items()))
        facts = [f for _, f in items]
        print(f"{kernel:<34} {dtype:<5} {len(items):3d}  {tally(f.mma for f in facts):<24} "
              f"{tally(f.async_copy for f in facts):<22} {max(f.wgmma_wait for f in facts):8d} "
              f"{max(f.narrow_loads for f in facts):6d} {max(s for s, _ in items):6d}")


def step(model: torch.nn.Module, x: torch.Tensor, train: bool, autocast: torch.dtype | None = None) -> None:
    """One training step's forward and backward (or an inference forward) of ``model`` on ``x``."""
    model.train(train)
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    if not train:
        with torch.no_grad(), ctx:
            model(x)
        return
    x = x.clone().requires_grad_(False)
    with ctx:
        out = model(x)
    out.float().sum().backward()


def workloads(which: str, batch: int = 64):
    """(name, build model, input shape, dtype of model and input, autocast dtype, channels_last, train)."""
    cases = []
    if which in ("quick", "all"):
        small = lambda **kw: densenet_fast.densenet_bc(depth=10, growth_rate=4, **kw)  # noqa: E731
        for train in (True, False):
            for cl in (False, True):
                cases += [
                    ("bc10 fp32", small, (2, 3, 8, 8), torch.float32, None, cl, train),
                    ("bc10 fp16", small, (2, 3, 8, 8), torch.float16, None, cl, train),
                    ("bc10 bf16 autocast", small, (2, 3, 8, 8), torch.float32, torch.bfloat16, cl, train),
                ]
        cases.append(("bc10 odd 7x9 fp32", small, (2, 3, 7, 9), torch.float32, None, False, True))
        cases.append(("bc10 dropout", lambda: small(drop_rate=0.2), (2, 3, 8, 8), torch.float32, None, False, True))
        cases.append(("bc10 keep bottlenecks", lambda: small(memory_efficient=False), (2, 3, 8, 8),
                      torch.float32, None, False, True))
    if which in ("bench", "all"):  # as tools/gpu_check.py runs them
        bc100 = lambda: densenet_fast.densenet_bc(depth=100, growth_rate=12)  # noqa: E731
        for amp, label in ((None, "fp32"), (torch.bfloat16, "bf16 autocast")):
            cases.append((f"densenet121 b{batch} 224² {label}", densenet_fast.densenet121, (batch, 3, 224, 224),
                          torch.float32, amp, False, True))
            cases.append((f"bc100 b{batch} 32² {label}", bc100, (batch, 3, 32, 32), torch.float32, amp, False, True))
    return cases


def run_shards(argv: list[str], jobs: int) -> int:
    """Runs the workloads in ``jobs`` processes (``--shard i/jobs`` each); the worst exit code."""
    procs = [subprocess.Popen([sys.executable, __file__, *argv, "--shard", f"{i}/{jobs}"]) for i in range(jobs)]
    return max(p.wait() for p in procs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100/H200, 80: A100)")
    parser.add_argument("--set", default="quick", choices=["quick", "bench", "all"],
                        help="quick: small nets in every mode; bench: gpu_check's benchmark workloads")
    parser.add_argument("--jobs", type=int, default=1, help="processes to share the workloads")
    parser.add_argument("--resources", action="store_true",
                        help="also registers, spilled bytes and shared memory per variant (ptxas -v)")
    parser.add_argument("--max-spill", type=int, default=None, metavar="BYTES",
                        help="with --resources: fail if a variant spills more than BYTES per thread")
    parser.add_argument("--check-sass", action="store_true",
                        help="with --resources: fail if an sm_90 variant breaks a rule of SASS_RULES (wgmma, cp.async)")
    parser.add_argument("--batch", type=int, default=64, help="batch of the bench workloads (gpu_check's: 64)")
    parser.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if (args.max_spill is not None or args.check_sass) and not args.resources:
        parser.error("--max-spill and --check-sass need --resources")
    if args.jobs > 1:
        options = ["--arch", str(args.arch), "--set", args.set, "--batch", str(args.batch)]
        options += ["--resources"] * args.resources
        options += ["--max-spill", str(args.max_spill)] if args.max_spill is not None else []
        options += ["--check-sass"] * args.check_sass
        return run_shards(options, args.jobs)
    index, count = map(int, args.shard.split("/"))
    install(args.arch, args.resources)
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}", flush=True)
    start = time.perf_counter()
    for name, build, shape, dtype, amp, channels_last, train in workloads(args.set, args.batch)[index::count]:
        print(f"-- {name}{' channels_last' if channels_last else ''}{' train' if train else ' eval'}", flush=True)
        torch.manual_seed(0)
        model = build().to(dtype)
        x = torch.randn(shape, dtype=dtype)
        if channels_last:
            model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        try:
            step(model, x, train, amp)
        except Exception as err:
            if not failures:  # not a compile error: a bug of this script or of the model's code
                raise
            print(f"   stopped by the compile error above ({type(err).__name__})", flush=True)
    per_kernel = defaultdict(lambda: [0, 0.0])
    for kernel, _, seconds in compiled:
        per_kernel[kernel][0] += 1
        per_kernel[kernel][1] += seconds
    print(f"\n{'kernel':<36} variants  seconds")
    for kernel, (count, seconds) in sorted(per_kernel.items()):
        print(f"{kernel:<36} {count:8d}  {seconds:7.1f}")
    if resources:
        spilling = sorted((r for r in resources if r[3]), key=lambda r: -r[3])
        print(f"\n{len(spilling)} of {len(resources)} variants spill registers" + (":" if spilling else ""))
        for kernel, label, registers, spilled, shared, _ in spilling:
            print(f"  {spilled:6d} B  {registers:3d} regs  {shared:6d} B shared  {kernel}  {label}")
        print_sass_summary(resources)
    print(f"{len(compiled)} variants compiled for sm_{args.arch} in {sum(s for *_, s in compiled):.1f} s "
          f"(whole run {time.perf_counter() - start:.1f} s)")
    if failures:
        print(f"{len(failures)} variant(s) FAILED to compile:")
        for kernel, label, err in failures:
            print(f"  {kernel}  {label}\n    {err[:500]}")
        return 1
    if args.max_spill is not None and any(r[3] > args.max_spill for r in resources):
        print(f"FAILED: variants spill more than {args.max_spill} B per thread (listed above)")
        return 1
    if args.check_sass:
        broken = sass_violations(resources, args.arch)
        print(f"SASS rules: {len(enforced_rules())} checked, {len(broken)} variant(s) break one"
              + (":" if broken else ""))
        for line in broken:
            print(f"  {line}")
        if broken:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
