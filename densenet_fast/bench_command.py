"""``densenet-fast bench``: its input checks (``validate``) and its run: the comparison set
(comparison.py) timed and measured (bench.py), printed as a table, optionally written as JSON, CSV
and a memory plot.
"""
from __future__ import annotations

import argparse

import torch

from .bench import MiB, StepResult, compare_steps, format_table, planned_steps, results_rows
from .comparison import BASELINE, comparison_models, min_image_size
from .tools import (
    PROG,
    UsageError,
    autocast_dtype,
    check_backends,
    check_device,
    check_output_path,
    machine,
    require,
    write_csv,
    write_json,
)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def validate(args: argparse.Namespace) -> None:
    """Every check of ``densenet-fast bench``'s input, before anything is built or measured; fills in
    ``args.model``, ``args.img_size``, ``args.device``, ``args.backends``, ``args.amp_dtype``."""
    from .builders import bc_layers_per_block  # torchvision's weight enums: imported when a command runs

    err = f"{PROG} bench: error:"
    if args.model and args.depth:
        raise UsageError(f"{err} give a model name or --depth, not both")
    args.model = None if args.depth else (args.model or "densenet121")
    args.img_size = args.img_size or (32 if args.depth else 224)
    for depth in ([args.depth] if args.depth else []) + (args.plot_depths if args.plot else []):
        try:
            bc_layers_per_block(depth)
        except ValueError as e:
            raise UsageError(f"{err} {e}") from None
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--rounds", args.rounds, 1),
                               ("--warmup", args.warmup, 0), ("--plot-batch", args.plot_batch, 1),
                               ("--growth-rate", args.growth_rate, 1)):
        if value < least:
            raise UsageError(f"{err} {flag} must be at least {least}, got {value}")
    if args.plot and min(args.plot_batches) < 1:
        raise UsageError(f"{err} --plot-batches must be at least 1, got {min(args.plot_batches)}")
    batch = min([args.batch_size] + (args.plot_batches if args.plot else []))  # the plot's batch panel too
    smallest = min_image_size(args.model, batch)
    what = args.model or "a DenseNet-BC"
    if args.img_size < smallest:
        raise UsageError(f"{err} --img-size {args.img_size} is too small for {what} at batch {batch}: "
                         f"its stem, transitions and batch norms need at least {smallest}x{smallest}")
    plot_smallest = min_image_size(None, args.plot_batch) if args.plot else 0
    if args.plot and args.plot_size < plot_smallest:
        raise UsageError(f"{err} --plot-size must be at least {plot_smallest}, got {args.plot_size}")
    if args.max_time is not None and args.max_time < 0:
        raise UsageError(f"{err} --max-time must be >= 0 seconds, got {args.max_time}")
    args.amp_dtype = autocast_dtype(args.amp, args.amp_dtype)
    if args.amp_dtype is not None and args.dtype != "float32":
        raise UsageError(f"{err} --amp runs float32 weights under autocast; drop --dtype {args.dtype}")
    args.device = check_device(args.device)
    args.backends = check_backends(args.backend, args.device, args.amp_dtype or DTYPES[args.dtype])
    for flag in ("json", "csv", "plot"):
        check_output_path(getattr(args, flag), f"--{flag}")
    if args.plot:
        require("matplotlib", "--plot")
        from matplotlib.figure import Figure

        suffix = args.plot.rsplit(".", 1)[-1].lower() if "." in args.plot else ""
        formats = Figure().canvas.get_supported_filetypes()
        if suffix not in formats:
            raise UsageError(f"{err} --plot {args.plot}: expected a file name ending in one of "
                             f"{', '.join('.' + f for f in sorted(formats))}")


def run(args: argparse.Namespace) -> int:
    """``densenet-fast bench`` after ``validate``."""
    from tqdm import tqdm

    device, amp, dtype = args.device, args.amp_dtype, DTYPES[args.dtype]
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    what = args.model or f"DenseNet-BC depth {args.depth} k={args.growth_rate}"
    precision = (f"autocast {str(amp).removeprefix('torch.')}" if amp else args.dtype) + (
        ", channels_last" if args.channels_last else "")
    n_models = 2 + args.compile + len(args.backends)
    sweeps = []  # the plot's memory-only configurations: (model, depth, batch, side, key, value)
    if args.plot:
        sweeps += [(None, d, args.plot_batch, args.plot_size, "depth", d) for d in args.plot_depths]
        sweeps += [(args.model, args.depth, b, args.img_size, "batch", b) for b in args.plot_batches]
    bar = tqdm(total=planned_steps(n_models, args.rounds, args.warmup) + len(sweeps) * planned_steps(n_models, 0, 0),
               desc=f"bench {what}", unit="step", leave=False, dynamic_ncols=True)

    def measure(model_name, depth, batch, side, rounds) -> list[StepResult]:
        models = comparison_models(model_name, depth, args.backends, args.growth_rate, args.compile,
                                   device=device, dtype=dtype, memory_format=layout)
        torch.manual_seed(0)
        x = torch.randn(batch, 3, side, side, device=device, dtype=dtype).contiguous(memory_format=layout)
        return compare_steps(models, x, rounds=rounds, autocast_dtype=amp, progress=bar.set_postfix_str,
                             warmup=args.warmup, max_time=args.max_time, bar=bar)

    results = measure(args.model, args.depth, args.batch_size, args.img_size, args.rounds)
    points: dict[str, list] = {}
    for model_name, depth, batch, side, key, value in sweeps:  # memory only, no timing rounds
        bar.set_description(f"plot: {key} {value}")
        for r in measure(model_name, depth, batch, side, 0):
            points.setdefault(key, []).append({"model": r.name, key: value, "peak_bytes": r.peak_bytes})
    bar.close()

    print(f"Training step of {what}, batch {args.batch_size}, {args.img_size}x{args.img_size}, {precision}, "
          f"{device.type}; {machine(device)}\n")
    print(format_table(results, BASELINE))
    rounds = len(results[0].step_times)
    print(f"\npeak memory: what a training step (forward, sum().backward()) allocates on top of the parameters and "
          f"their gradients: activations, saved tensors, temporaries. Step time: median of {rounds} interleaved "
          f"timed steps per model after {args.warmup} warm-up round(s); IQR: the spread of the middle half "
          f"({'noisy: over 10% of the median' if not all(r.stable for r in results) else 'every IQR under 10%'}).")
    config = {"model": what, "batch": args.batch_size, "img_size": args.img_size, "precision": precision,
              "device": str(device), "compile": args.compile, "backends": args.backends, "rounds": rounds,
              "warmup": args.warmup, "machine": machine(device), "command": " ".join([PROG] + args.argv)}
    rows = results_rows(results, BASELINE)
    if args.json:
        write_json(args.json, {"config": config, "results": rows, "sweeps": points})
    if args.csv:
        write_csv(args.csv, rows)
    if args.plot:
        plot_memory(args.plot, points, f"DenseNet-BC k={args.growth_rate}, batch {args.plot_batch}, "
                    f"{args.plot_size}x{args.plot_size}", f"{what}, {args.img_size}x{args.img_size}",
                    f"{precision}, {machine(device)}")
        print(f"plot: {args.plot}")
    return 0


def plot_memory(path: str, sweeps: dict[str, list], depth_title: str, batch_title: str, footer: str) -> None:
    """Two panels: peak memory against DenseNet-BC depth, and against batch size, one line per model."""
    matplotlib = require("matplotlib", "--plot")
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, title in ((axes[0], "depth", depth_title), (axes[1], "batch", batch_title)):
        points = sweeps.get(key, [])
        for name in dict.fromkeys(p["model"] for p in points):
            xs = [p[key] for p in points if p["model"] == name]
            ys = [p["peak_bytes"] / MiB for p in points if p["model"] == name]
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
