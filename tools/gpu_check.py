"""The benchmark part of ``tools/gpu_check``: densenet_fast's backends against torchvision on CUDA.

    python tools/gpu_check.py --out FILE [--deadline EPOCH_SECONDS] [--compile] [--tf32 off]
    python tools/gpu_check.py --cpu-smoke --out FILE   # tiny shapes on CPU: checks the plumbing only

float32 is compared like for like: TF32 on both sides by default (torch.backends.cudnn.allow_tf32
for torchvision's cuDNN convolutions, torch.backends.cuda.matmul.allow_tf32 for the triton
backend's GEMMs), or off on both with ``--tf32 off``; the header says which.

Workloads: DenseNet-121 at batch 64, 224x224 and DenseNet-BC-100 (k=12) at batch 64, 32x32, each
under bfloat16 autocast first, then in float32. For every workload one markdown table over
torchvision with memory_efficient=False and True (plus torch.compile'd torchvision with
``--compile``) and each densenet_fast backend that computes on the workload's input (every
available backend whose ``supports(x)`` says yes: a new backend is benchmarked without a change
here), the set built by densenet_fast.comparison.comparison_models: peak memory (torch.cuda.max_memory_allocated),
median eager training-step time, the step replayed as a CUDA graph (or why it can't be captured),
kernels per step and the share of the step's wall time the GPU is busy (one profiled eager step:
the union of its kernels' intervals over the step), with the issue's targets checked beside. Each
table is appended to ``--out`` as soon as it exists (and a JSON line per model to ``--out``'s
.jsonl beside it), so a run cut short still leaves what it measured; a workload that fails is
reported and the next one runs; workloads that would start past ``--deadline`` are listed as skipped.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from typing import Optional

import torch
import torchvision
from torch import nn

import densenet_fast
from densenet_fast.bench import MiB, StepResult, compare_steps, make_step
from densenet_fast.comparison import BASELINE, MEMORY_EFFICIENT, backends_for, comparison_models, fast_name

TV, TV_ME = BASELINE, MEMORY_EFFICIENT
# The targets for densenet_fast.
MEMORY_TARGET = 0.25  # peak memory vs torchvision
TIME_TARGET = {"float32": 1.0, "bf16 autocast": 0.9}  # step time vs torchvision
SPEEDUP_VS_ME = 1.3  # at least this much faster than torchvision memory_efficient=True


def check_targets(r: StepResult, tv: StepResult, tv_me: Optional[StepResult], precision: str) -> str:
    mem = r.peak_bytes / tv.peak_bytes
    t = r.step_time / tv.step_time
    marks = [f"mem {mem:.2f}x (<= {MEMORY_TARGET}) {'PASS' if mem <= MEMORY_TARGET else 'FAIL'}",
             f"time {t:.2f}x (<= {TIME_TARGET[precision]}) {'PASS' if t <= TIME_TARGET[precision] else 'FAIL'}"]
    if tv_me is not None:
        speedup = tv_me.step_time / r.step_time
        marks.append(f"{speedup:.2f}x faster than memory_efficient (>= {SPEEDUP_VS_ME}) "
                     f"{'PASS' if speedup >= SPEEDUP_VS_ME else 'FAIL'}")
    return "; ".join(marks)


def graph_step_time(model: nn.Module, x: torch.Tensor, autocast_dtype, rounds: int) -> str:
    """Median time of the training step replayed as a CUDA graph, or why it can't be captured."""
    if x.device.type != "cuda":
        return "n/a (CPU)"
    step = make_step(model, x, autocast_dtype)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # capture needs warmed-up kernels and existing .grad tensors
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        times = []
        for _ in range(rounds):
            torch.cuda.synchronize()
            start = time.perf_counter()
            graph.replay()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        del graph
        return f"{statistics.median(times) * 1e3:.1f} ms"
    except Exception as err:  # report, don't stop: a step with a host sync can't be captured
        torch.cuda.synchronize()
        return f"not capturable: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"


def kernels_and_busy_share(model: nn.Module, x: torch.Tensor, autocast_dtype) -> tuple[str, str]:
    """(kernels launched by one eager training step, share of its wall time the GPU is busy),
    from a profiled step: the busy time is the union of the kernels' intervals."""
    if x.device.type != "cuda":
        return "n/a (CPU)", "n/a (CPU)"
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step = make_step(model, x, autocast_dtype)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        begin = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - begin) * 1e6
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset")))
    busy, end = 0.0, float("-inf")
    for a, b in spans:  # the union of the intervals
        if b > end:
            busy += b - max(a, end)
            end = b
    return str(len(spans)), f"{busy / wall_us:.0%} of {wall_us / 1e3:.1f} ms (profiled)"


def format_results(results: list[StepResult], extras: dict[str, tuple[str, str, str]], precision: str) -> str:
    by_name = {r.name: r for r in results}
    tv, tv_me = by_name.get(TV), by_name.get(TV_ME)
    lines = [("| model | peak memory | vs tv | vs tv mem-eff | step time | vs tv | vs tv mem-eff | CUDA graph step | "
              "kernels per step | GPU busy | targets |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        def ratio(base, attr):  # called only within this iteration, for this r
            return f"{getattr(r, attr) / getattr(base, attr):.3f}x" if base is not None else "-"  # noqa: B023
        targets = check_targets(r, tv, tv_me, precision) if r.name.startswith("densenet_fast") and tv else ""
        graph, kernels, busy = extras.get(r.name, ("-", "-", "-"))
        lines.append(f"| {r.name} | {r.peak_bytes / MiB:.1f} MiB | {ratio(tv, 'peak_bytes')} | "
                     f"{ratio(tv_me, 'peak_bytes')} | {r.step_time * 1e3:.1f} ms | {ratio(tv, 'step_time')} | "
                     f"{ratio(tv_me, 'step_time')} | {graph} | {kernels} | {busy} | {targets} |")
    return "\n".join(lines)


def usable(models: dict[str, nn.Module], x: torch.Tensor, autocast_dtype, log) -> dict[str, nn.Module]:
    """The models whose training step runs here (a backend that can't serve x is dropped, and said so)."""
    kept = {}
    for name, model in models.items():
        try:
            model.train()
            make_step(model, x, autocast_dtype)()
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            kept[name] = model
        except Exception as err:  # one failing model must not cost the others' figures
            log(f"- {name}: dropped, {type(err).__name__}: {str(err).splitlines()[0][:300]}")
        finally:
            for p in model.parameters():
                p.grad = None
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="markdown file the tables are appended to")
    parser.add_argument("--deadline", type=float, default=None, help="epoch seconds: start no workload after it")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also torch.compile'd torchvision (slow to compile)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, to check the script itself")
    parser.add_argument("--tf32", choices=["on", "off"], default="on",
                        help="float32 GEMMs and convolutions in TF32 on both sides (default) or on neither")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32 == "on"

    def log(line: str) -> None:
        print(line, flush=True)
        with open(args.out, "a") as f:
            f.write(line + "\n")

    def record(entry: dict) -> None:
        with open(args.out.rsplit(".", 1)[0] + ".jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    # (title, torchvision model name or None for a DenseNet-BC, its depth, growth rate, batch, image side)
    if args.cpu_smoke:
        device = torch.device("cpu")
        workloads = [("DenseNet-BC-10 (k=4)", None, 10, 4, 2, 16), ("DenseNet-121", "densenet121", None, 32, 2, 32)]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device (use --cpu-smoke to check the script on CPU)")
        device = torch.device("cuda")
        workloads = [("DenseNet-121", "densenet121", None, 32, 64, 224),
                     ("DenseNet-BC-100 (k=12)", None, 100, 12, 64, 32)]
    precisions = [("bf16 autocast", torch.bfloat16), ("float32", None)]  # bf16 first: the headline
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke test: plumbing only)"
    log(f"\n## Benchmarks on {name}\n\ntorch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"densenet_fast backends {densenet_fast.available_backends()}; float32 like for like, TF32 "
        f"{'on both sides' if args.tf32 == 'on' else 'off on both sides'} (matmul, which the triton backend follows: "
        f"{torch.backends.cuda.matmul.allow_tf32}; cuDNN, torchvision's convolutions: "
        f"{torch.backends.cudnn.allow_tf32}); "
        f"{args.rounds} timed rounds (median)\n")

    for title, model, depth, growth_rate, batch, size in workloads:
        for precision, autocast_dtype in precisions:
            heading = f"### {title}, batch {batch}, {size}x{size}, {precision}"
            if args.deadline is not None and time.time() > args.deadline:
                log(f"{heading}\n\nskipped: out of time\n")
                continue
            log(heading + "\n")
            start = time.time()
            try:
                with_compile = args.compile and (args.deadline is None or args.deadline - time.time() > 240)
                torch.manual_seed(1)
                x = torch.randn(batch, 3, size, size, device=device)
                backends = backends_for(x, autocast_dtype)  # every available backend that computes on x
                skipped = [b for b in densenet_fast.available_backends() if b not in backends]
                if skipped:
                    log(f"- not for {autocast_dtype or x.dtype} on {device.type}: "
                        f"{', '.join(fast_name(b) for b in skipped)}")
                torch.manual_seed(0)
                models = comparison_models(model, depth, backends, growth_rate, with_compile, device=device)
                models = usable(models, x, autocast_dtype, log)
                results = compare_steps(models, x, rounds=args.rounds, autocast_dtype=autocast_dtype,
                                        progress=lambda s: print(f"  {s}", flush=True))
                extras = {}
                for r in results:
                    print(f"  {r.name}: CUDA graph, profiled step", flush=True)
                    extras[r.name] = (graph_step_time(models[r.name], x, autocast_dtype, args.rounds),
                                      *kernels_and_busy_share(models[r.name], x, autocast_dtype))
                    record({"workload": heading[4:], "model": r.name, "peak_bytes": r.peak_bytes,
                            "step_s": r.step_time, "cuda_graph": extras[r.name][0], "kernels": extras[r.name][1],
                            "gpu_busy": extras[r.name][2], "tf32": args.tf32, "device": name})
                log(format_results(results, extras, precision))
                log(f"\n({time.time() - start:.0f} s including warm-up and kernel compilation)\n")
            except Exception as err:
                log(f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:500] if str(err) else ''}\n")
                traceback.print_exc()
            finally:
                models = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
