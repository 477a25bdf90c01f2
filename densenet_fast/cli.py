"""The ``densenet-fast`` command (also ``python -m densenet_fast``).

    densenet-fast bench [densenet121 | --depth 100] [--batch 8] [--size 224] [--amp bf16] [--plot mem.png]
    densenet-fast train [--depth 16] [--epochs 6] [--checkpoint ckpt.pt] [--resume]
    densenet-fast max-depth [--budget 12GiB] [--growth-rate 12] [--batch 64] [--size 32]
    densenet-fast                      # the README's main job: check, train, bench table

Bad input (an unknown model, a budget too small, ``--device cuda`` without CUDA) is reported as one
line on stderr with exit status 2, not a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import re
import sys
import tempfile
from typing import Iterator, Optional, TextIO

import torch
from tqdm import tqdm

from . import bench as B
from .ops import available_backends
from .train import TrainConfig, autocast_dtype, resolve_device, train

PROG = "densenet-fast"


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage; one line is clearer
        raise UsageError(f"{self.prog}: error: {message}")


# --- Helpers shared by the commands ---------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 10 ** 3, "m": 1 << 20, "mib": 1 << 20, "mb": 10 ** 6,
          "g": 1 << 30, "gib": 1 << 30, "gb": 10 ** 9, "t": 1 << 40, "tib": 1 << 40, "tb": 10 ** 12}


def parse_size(text: str) -> int:
    """'12GiB' -> bytes. GiB/MiB are binary, GB/MB decimal, a bare G or M binary."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 12GiB, 500MiB, 16GB)")
    return int(float(match.group(1)) * _UNITS[unit])


def human(nbytes: float) -> str:
    if nbytes == float("inf"):
        return "out of memory"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes:.0f} B"


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"{os.cpu_count()}-core {platform.machine()} CPU ({torch.get_num_threads()} threads), "
            f"torch {torch.__version__}, no GPU used")


_NATIVE_LOG = re.compile(r"^(STAGE|USDT|ERROR|WARNING|INFO):\d{4}-\d\d-\d\d [0-9:]+ \d+:\d+ \w+\.cpp:\d+\]"
                         r"|^\[W\d+ [0-9:.]+ CPUAllocator\.cpp:\d+\] Memory block of unknown size")


@contextlib.contextmanager
def quiet_profiler() -> Iterator[TextIO]:
    """Hide the CPU profiler's native log lines ('profiler_start', 'gpuGetDeviceCount failed'...).

    They are written by C++ straight to file descriptor 2, so fd 2 goes to a temporary file while
    measuring and everything else in it is replayed afterwards. Yields a stream on the real stderr
    for progress bars.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    real = os.fdopen(os.dup(saved), "w", buffering=1)
    with tempfile.TemporaryFile(mode="w+") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield real
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            real.close()
            capture.seek(0)
            for line in capture:
                if not _NATIVE_LOG.match(line):
                    sys.stderr.write(line)


def _device(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except ValueError as err:
        raise UsageError(f"{PROG}: error: {err}") from None


def _backends(requested: Optional[list[str]], device: torch.device, dtype: torch.dtype) -> list[str]:
    """The requested (default: all available) backends that can compute on ``dtype`` tensors on ``device``;
    the others are named on stderr."""
    from .ops import backend_for, get_backend_name, set_backend

    available = available_backends()
    missing = [b for b in requested or [] if b not in available]
    if missing:
        raise UsageError(f"{PROG}: error: backend {missing[0]!r} is not available here (available: {available})")
    usable = []
    previous = get_backend_name()
    probe = torch.empty(2, 1, 1, 1, device=device, dtype=dtype)
    for name in requested or available:
        try:
            set_backend(name)
            backend_for(probe)
            usable.append(name)
        except (TypeError, ValueError, RuntimeError) as err:
            print(f"{PROG}: skipping backend {name!r} for {dtype} on {device.type}: {err}", file=sys.stderr)
        finally:
            set_backend(previous)
    if not usable:
        raise UsageError(f"{PROG}: error: no densenet_fast backend computes on {dtype} tensors on {device.type}")
    return usable


def _write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def _write_csv(path: str, rows: list[dict]) -> None:
    fields = [k for k in rows[0] if not isinstance(rows[0][k], list)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# --- bench ----------------------------------------------------------------------------------------

def run_bench(args: argparse.Namespace) -> int:
    if args.model and args.depth:
        raise UsageError(f"{PROG} bench: error: give a model name or --depth, not both")
    model = None if args.depth else (args.model or "densenet121")
    size = args.size or (32 if args.depth else 224)
    device = _device(args.device)
    if args.amp and args.dtype != "float32":
        raise UsageError(f"{PROG} bench: error: --amp runs float32 weights under autocast; drop --dtype {args.dtype}")
    dtype, amp = B.DTYPES[args.dtype], autocast_dtype(args.amp)
    backends = _backends(args.backend, device, amp or dtype)
    what = model or f"DenseNet-BC depth {args.depth} k={args.growth_rate}"
    precision = f"autocast {args.amp}" if amp else args.dtype

    def measure(model_name, depth, batch, side, rounds, bar) -> list[B.StepResult]:
        models = B.comparison_models(model_name, depth, backends, args.growth_rate, args.compile)
        models = {name: m.to(device=device, dtype=dtype) for name, m in models.items()}
        torch.manual_seed(0)
        x = torch.randn(batch, 3, side, side, device=device, dtype=dtype)
        return B.compare_steps(models, x, rounds=rounds, autocast_dtype=amp, progress=bar.set_postfix_str)

    header = (f"Training step of {what}, batch {args.batch}, {size}x{size}, {precision}, {device.type}; "
              f"{machine(device)}")
    if min([args.batch, args.rounds + 1, size] + args.plot_batches + args.plot_depths) < 1:
        raise UsageError(f"{PROG} bench: error: batches, sizes, depths must be positive and --rounds >= 0")
    sweeps: dict[str, list] = {}
    with quiet_profiler() as stream:
        bar = tqdm(total=1 + (len(args.plot_depths) + len(args.plot_batches) if args.plot else 0),
                   desc="bench", file=stream, leave=False, dynamic_ncols=True)
        bar.set_description(f"bench {what}")
        results = measure(model, args.depth, args.batch, size, args.rounds, bar)
        bar.update()
        if args.plot:
            # Memory only (no timing rounds): DenseNet-BC over depth, then the benchmarked model over batch.
            for d in args.plot_depths:
                bar.set_description(f"plot: DenseNet-BC depth {d}")
                for r in measure(None, d, args.plot_batch, args.plot_size, 0, bar):
                    sweeps.setdefault("depth", []).append({"model": r.name, "depth": d, "peak_bytes": r.peak_bytes})
                bar.update()
            for b in args.plot_batches:
                bar.set_description(f"plot: {what} batch {b}")
                for r in measure(model, args.depth, b, size, 0, bar):
                    sweeps.setdefault("batch", []).append({"model": r.name, "batch": b, "peak_bytes": r.peak_bytes})
                bar.update()
        bar.close()

    print(f"{header}\n")
    print(B.format_table(results, B.BASELINE))
    print("\npeak memory: what a training step (forward, sum().backward()) allocates on top of the parameters and "
          "their gradients: activations, saved tensors, temporaries. Step time: median of "
          f"{args.rounds} interleaved steps.")
    config = {"model": what, "batch": args.batch, "size": size, "precision": precision, "device": str(device),
              "compile": args.compile, "backends": backends, "machine": machine(device),
              "command": " ".join([PROG] + args.argv)}
    rows = B.results_rows(results)
    if args.json:
        _write_json(args.json, {"config": config, "results": rows, "sweeps": sweeps})
    if args.csv:
        _write_csv(args.csv, rows)
    if args.plot:
        plot_memory(args.plot, sweeps, f"DenseNet-BC k={args.growth_rate}, batch {args.plot_batch}, "
                    f"{args.plot_size}x{args.plot_size}", f"{what}, {size}x{size}", f"{precision}, {machine(device)}")
        print(f"plot: {args.plot}")
    return 0


def plot_memory(path: str, sweeps: dict[str, list], depth_title: str, batch_title: str, footer: str) -> None:
    """Two panels: peak memory against DenseNet-BC depth, and against batch size, one line per model."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, title in ((axes[0], "depth", depth_title), (axes[1], "batch", batch_title)):
        points = sweeps.get(key, [])
        for name in dict.fromkeys(p["model"] for p in points):
            xs = [p[key] for p in points if p["model"] == name]
            ys = [p["peak_bytes"] / B.MiB for p in points if p["model"] == name]
            ax.plot(xs, ys, marker="o", label=name)
        ax.set_xlabel(key)
        ax.set_ylabel("peak training-step memory (MiB)")
        ax.set_title(f"memory vs {key}: {title}", fontsize=10)
        ax.grid(True, alpha=0.3)
        if points:
            ax.legend(fontsize=8)
    fig.text(0.5, 0.01, footer, ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- train ----------------------------------------------------------------------------------------

def run_train(args: argparse.Namespace) -> int:
    _device(args.device)
    config = TrainConfig(depth=args.depth, growth_rate=args.growth_rate, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, device=args.device, amp=args.amp,
                         checkpoint=args.checkpoint, resume=args.resume, seed=args.seed)
    with quiet_profiler():
        history = train(config, log=tqdm.write)
    if args.json:
        _write_json(args.json, {"config": vars(config), "epochs": [vars(h) for h in history]})
    return 0


# --- max-depth ------------------------------------------------------------------------------------

def run_max_depth(args: argparse.Namespace) -> int:
    device = _device(args.device)
    if len(set(args.fit_depths)) < 3 or any(d < 10 or (d - 4) % 6 for d in args.fit_depths):
        raise UsageError(f"{PROG} max-depth: error: --fit-depths needs at least 3 different depths of the form 6n+4")
    if args.batch < 1 or args.size < 8:
        raise UsageError(f"{PROG} max-depth: error: --batch must be >= 1 and --size >= 8")
    floor = B.bc_state_bytes(10, args.growth_rate) + args.batch * (3 * args.size * args.size * 4 + 8)
    if floor > args.budget:  # no need to measure anything
        raise UsageError(f"{PROG} max-depth: error: budget {human(args.budget)} is too small: DenseNet-BC depth 10 "
                         f"(k={args.growth_rate}, batch {args.batch}, {args.size}x{args.size}) needs more than "
                         f"{human(floor)} before any activation")
    kinds = [f"densenet_fast[{b}]" for b in _backends(args.backend, device, torch.float32)] + list(B.MAX_DEPTH_KINDS)
    estimate = device.type == "cpu" and args.batch > 2
    results = []
    with quiet_profiler() as stream:
        bar = tqdm(kinds, desc="max-depth", file=stream, leave=False, dynamic_ncols=True)
        for kind in bar:
            bar.set_description(kind)
            verify_cap = args.verify_max_depth or (1000 if device.type == "cpu" else None)
            results.append(B.max_depth(kind, args.budget, args.growth_rate, args.batch, args.size, device,
                                       tuple(args.fit_depths), verify_cap, progress=bar.set_postfix_str))
        bar.close()
    if all(r.depth == 0 for r in results):
        raise UsageError(f"{PROG} max-depth: error: budget {human(args.budget)} is too small: even DenseNet-BC depth 10 "
                         f"(k={args.growth_rate}, batch {args.batch}, {args.size}x{args.size}) needs about "
                         f"{human(min(r.next_depth_bytes for r in results))}")

    print(f"Deepest DenseNet-BC (k={args.growth_rate}) whose training step fits in {human(args.budget)}: batch "
          f"{args.batch}, {args.size}x{args.size}, float32, SGD with momentum; {machine(device)}\n")
    print("| model | depth | parameters | peak (" + ("estimated" if estimate else "measured")
          + ") | of which params+grads+momentum | next depth would need | fit checked at | fit error |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        depth = str(r.depth) if r.depth else "none fits"
        print(f"| {r.kind} | {depth} | {r.parameters / 1e6:.1f} M | {human(r.total_bytes)} | {human(r.state_bytes)} | "
              f"{human(r.next_depth_bytes)} | {r.verified_depth or '-'} | {r.fit_error:+.1%} |")
    print("\ncounted: parameters, BN buffers, gradients and SGD momentum buffers (3 x parameter bytes, from the "
          "architecture), the input batch, and the peak of what a training step (forward, cross-entropy, backward, "
          "SGD step) allocates on top: activations, saved tensors, temporaries. That step peak is measured at depths "
          f"{', '.join(map(str, args.fit_depths))}, fitted with a quadratic in depth, and measured again at the "
          "answer (or at --verify-max-depth when the answer is deeper; 'fit checked at') to correct the fit.")
    if estimate:
        print(f"CPU: an estimate. The step peak is measured with the profiler at batches 1 and 2 and scaled to batch "
              f"{args.batch} (the per-image part scales with the batch, the rest doesn't); the fit check is at batch 1.")
    if args.json:
        _write_json(args.json, {"config": {"budget_bytes": args.budget, "growth_rate": args.growth_rate,
                                           "batch": args.batch, "size": args.size, "device": str(device),
                                           "estimate": estimate, "machine": machine(device)},
                                "results": [dict(vars(r), total_bytes=r.total_bytes) for r in results]})
    return 0


# --- The parser and the entry point ---------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Train torchvision-compatible DenseNets in a fraction of the memory. "
                     "With no command: a float64 check against torchvision, `train` with its defaults, "
                     "then a `bench` table.")
    commands = parser.add_subparsers(dest="command", metavar="{bench,train,max-depth}")

    p = commands.add_parser("bench", help="peak memory and step time: ours (each backend) against torchvision")
    p.add_argument("model", nargs="?", choices=B.MODEL_NAMES, help="torchvision model (default densenet121)")
    p.add_argument("--depth", type=int, help="a DenseNet-BC of this depth (6n+4) instead of a named model")
    p.add_argument("--growth-rate", type=int, default=12, help="k of --depth and of the plot's depth panel")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, help="image side (default 224, or 32 with --depth)")
    p.add_argument("--dtype", choices=list(B.DTYPES), default="float32")
    p.add_argument("--amp", choices=list(B.AMP_DTYPES), help="autocast dtype (weights stay float32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3, help="timed steps per model; the median is reported")
    p.add_argument("--compile", action="store_true", help="also torch.compile'd torchvision")
    p.add_argument("--backend", action="append", help="only this densenet_fast backend (repeatable)")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--csv", metavar="FILE")
    p.add_argument("--plot", metavar="FILE.png", help="memory against depth and against batch")
    p.add_argument("--plot-depths", type=int, nargs="+", default=[40, 100, 160, 250])
    p.add_argument("--plot-batch", type=int, default=16, help="batch of the depth panel")
    p.add_argument("--plot-size", type=int, default=32, help="image side of the depth panel")
    p.add_argument("--plot-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.set_defaults(run=run_bench)

    defaults = TrainConfig()
    p = commands.add_parser("train", help="train a DenseNet-BC on scikit-learn's handwritten digits")
    p.add_argument("--depth", type=int, default=defaults.depth, help="6n+4")
    p.add_argument("--growth-rate", type=int, default=defaults.growth_rate)
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--device", default=defaults.device)
    p.add_argument("--amp", choices=list(B.AMP_DTYPES))
    p.add_argument("--checkpoint", metavar="PATH", help="write model, optimizer and epoch here after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--json", metavar="FILE", help="per-epoch statistics")
    p.set_defaults(run=run_train)

    p = commands.add_parser("max-depth", help="deepest DenseNet-BC that trains within a memory budget")
    p.add_argument("--budget", type=parse_size, default=parse_size("12GiB"), help="e.g. 12GiB (default), 500MiB")
    p.add_argument("--growth-rate", type=int, default=12)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", action="append", help="only this densenet_fast backend (repeatable)")
    p.add_argument("--fit-depths", type=int, nargs="+", default=[40, 100, 250],
                   help="depths measured for the fit (at least 3)")
    p.add_argument("--verify-max-depth", type=int, help="check the fit at the answer or at most this depth "
                   "(default: 1000 on CPU, where a deeper step takes minutes; no limit on CUDA)")
    p.add_argument("--json", metavar="FILE")
    p.set_defaults(run=run_max_depth)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = build_parser().parse_args(argv)
        args.argv = argv
        if args.command is None:
            from .demo import main as demo

            demo()
            return 0
        return args.run(args)
    except UsageError as err:
        print(err, file=sys.stderr)
        return 2
    except ValueError as err:  # the library's own checks: a depth that is not 6n+4, a bad --amp...
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
