"""``densenet-fast bench``: peak memory and step time of ours against torchvision, measured in one run.

A step is forward, ``.sum().backward()``. Each model gets a warm-up step first, so parameter
gradients already exist and the peak counts activations and transients, as in a training loop
that zeroes gradients in place. Timing follows torch.utils.benchmark's rules: warm-up rounds that
are not timed, then timed rounds until the interquartile range (IQR) is under 10% of the median
(its "could indicate system fluctuation" threshold) or the time limit is spent, and the median
and IQR are its ``Measurement``'s. The rounds are interleaved across models, so a noisy neighbour
on a shared machine slows every model alike.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.utils.benchmark import Measurement, TaskSpec

from .memory import peak_memory
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

MiB = 1 << 20
IQR_THRESHOLD = 0.1  # torch.utils.benchmark's _IQR_WARN_THRESHOLD: above it, "system fluctuation"


@dataclass
class StepResult:
    name: str
    peak_bytes: int
    step_times: list[float] = field(default_factory=list)
    images: int = 0  # per step (the batch), for the throughput

    @property
    def measurement(self) -> Optional[Measurement]:
        if not self.step_times:
            return None
        return Measurement(number_per_run=1, raw_times=list(self.step_times), task_spec=TaskSpec(self.name, "pass"))

    @property
    def step_time(self) -> float:
        m = self.measurement
        return m.median if m else float("nan")

    @property
    def iqr(self) -> float:
        m = self.measurement
        return m.iqr if m else float("nan")

    @property
    def throughput(self) -> float:
        """Images per second at the median step time."""
        return self.images / self.step_time if self.images else float("nan")

    @property
    def stable(self) -> bool:
        m = self.measurement
        return bool(m) and len(self.step_times) >= 4 and m.meets_confidence(IQR_THRESHOLD)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model: nn.Module, x: torch.Tensor, autocast_dtype: Optional[torch.dtype] = None) -> Callable[[], None]:
    """A closure running one training step of ``model`` on ``x``."""

    def step() -> None:
        if autocast_dtype is None:
            out = model(x)
        else:
            with torch.autocast(x.device.type, dtype=autocast_dtype):
                out = model(x)
        out.float().sum().backward()

    return step


def compare_steps(models: dict[str, nn.Module], x: torch.Tensor, rounds: int = 5,
                  autocast_dtype: Optional[torch.dtype] = None,
                  progress: Optional[Callable[[str], None]] = None, warmup: int = 1,
                  max_time: Optional[float] = None, bar=None,
                  timer: Callable[[], float] = time.perf_counter) -> list[StepResult]:
    """Peak memory and step times of each model on the same input, measured in one run.

    ``warmup`` untimed rounds, then at least ``rounds`` timed ones (0: memory only); with ``max_time``
    (seconds of timed rounds), more rounds until every model's IQR is under 10% of its median.
    ``bar`` (a tqdm) moves one step per training step run; its total grows with added rounds.
    ``timer``: seconds, as torch.utils.benchmark.Timer's argument of that name.
    """
    results: list[StepResult] = []
    steps = {}

    def ran(count: int = 1) -> None:
        if bar is not None:
            bar.update(count)

    for name, model in models.items():
        if progress:
            progress(f"{name}: warm-up and peak memory")
        model.train()
        step = make_step(model, x, autocast_dtype)
        step()  # warm-up: allocator, kernels, parameter gradients
        _sync(x.device)
        ran()
        results.append(StepResult(name, peak_memory(step, x.device), images=x.shape[0]))
        ran()
        steps[name] = step
    if rounds < 1:
        return results
    for r in range(warmup):
        if progress:
            progress(f"warm-up round {r + 1}/{warmup}")
        for result in results:
            steps[result.name]()
            ran()
    _sync(x.device)
    timed, r = 0.0, 0
    while r < rounds or (max_time is not None and timed < max_time and not all(x.stable for x in results)):
        r += 1
        if r > rounds and bar is not None:
            bar.total += len(results)
            bar.refresh()
        if progress:
            progress(f"timing round {r}" + (f"/{rounds}" if r <= rounds else " (until the IQR is < 10%)"))
        for result in results:
            start = timer()
            steps[result.name]()
            _sync(x.device)
            result.step_times.append(timer() - start)
            timed += result.step_times[-1]
            ran()
    return results


def planned_steps(n_models: int, rounds: int, warmup: int) -> int:
    """Training steps ``compare_steps`` runs before any added round."""
    return n_models * (2 + (warmup + rounds if rounds else 0))


def activation_peak(model: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes of one training step after a warm-up step (parameter gradients already exist)."""
    model.train()
    step = make_step(model, x)
    step()
    return peak_memory(step, x.device)


def format_table(results: list[StepResult], baseline: str) -> str:
    """A markdown table with ratios against the result named ``baseline``."""
    base = next(r for r in results if r.name == baseline)
    lines = [f"| model | peak memory | vs {baseline} | step time (median) | IQR | images/s | vs {baseline} |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        noisy = "" if r.stable else " (noisy)" if len(r.step_times) >= 4 else " (< 4 runs)"
        lines.append(f"| {r.name} | {r.peak_bytes / MiB:.0f} MiB | {r.peak_bytes / base.peak_bytes:.3f}x "
                     f"| {r.step_time:.3f} s | {r.iqr:.3f} s ({r.iqr / r.step_time:.0%}){noisy} "
                     f"| {r.throughput:.1f} | {r.step_time / base.step_time:.3f}x |")
    return "\n".join(lines)


def results_rows(results: list[StepResult], baseline: str = "torchvision") -> list[dict]:
    """One dict per result with ratios against ``baseline`` (for JSON/CSV output)."""
    base = next(r for r in results if r.name == baseline)
    return [{"model": r.name, "peak_bytes": r.peak_bytes, "peak_mib": round(r.peak_bytes / MiB, 2),
             "memory_vs_baseline": round(r.peak_bytes / base.peak_bytes, 4),
             "step_time_s": round(r.step_time, 4), "iqr_s": round(r.iqr, 4), "stable": r.stable,
             "images_per_s": float(f"{r.throughput:.4g}"), "time_vs_baseline": round(r.step_time / base.step_time, 4),
             "step_times_s": [round(t, 4) for t in r.step_times]} for r in results]


def torchvision_densenet_bc(depth: int, growth_rate: int = 12, num_classes: int = 10,
                            memory_efficient: bool = False) -> nn.Module:
    """torchvision's DenseNet in the DenseNet-BC CIFAR configuration (3x3 stem, no pooling stem)."""
    import torchvision

    check_bc_depth(depth)
    n = (depth - 4) // 6
    model = torchvision.models.DenseNet(growth_rate, (n, n, n), 2 * growth_rate, num_classes=num_classes,
                                        memory_efficient=memory_efficient)
    model.features.conv0 = nn.Conv2d(3, 2 * growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
    for name in ("norm0", "relu0", "pool0"):
        delattr(model.features, name)
    return model


def check_bc_depth(depth: int) -> None:
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"DenseNet-BC depth must be 6n + 4 with n >= 1, got {depth}")


# --- What the command compares ----------------------------------------------------------------------

MODEL_NAMES = ("densenet121", "densenet161", "densenet169", "densenet201", "densenet264")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
BASELINE = "torchvision"


def last_block_side(model: Optional[str], side: int) -> int:
    """The image side the last dense block sees: a DenseNet-BC (stride-1 stem) halves it in each of its 2
    transitions (2x2 average pooling); the ImageNet models first run a 7x7 stride-2 conv and a 3x3
    stride-2 max pool (both padded), then 3 transitions."""
    if model is None:
        return side // 4
    side = (side - 1) // 2 + 1
    side = (side - 1) // 2 + 1
    return side // 8


def min_image_size(model: Optional[str], batch: int = 2) -> int:
    """The smallest image side a training step of ``batch`` images runs at: the last block needs a pixel,
    and its batch norms more than one value per channel (batch x side^2 > 1). Batch 2 or more: 4 for a
    DenseNet-BC, 29 for the ImageNet models (torchvision's ``min_size`` for their weights)."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    side = 1
    while last_block_side(model, side) < 1 or batch * last_block_side(model, side) ** 2 < 2:
        side += 1
    return side


class Pinned(nn.Module):
    """Runs ``model``'s forward with ``backend`` pinned; backward reuses the backend the forward chose."""

    def __init__(self, model: nn.Module, backend: str):
        super().__init__()
        self.model, self.backend = model, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .ops import use_backend

        with use_backend(self.backend):
            return self.model(x)


def torchvision_model(model: Optional[str], depth: Optional[int], growth_rate: int = 12,
                      memory_efficient: bool = False) -> nn.Module:
    """torchvision's ``model`` (a name from MODEL_NAMES), or its DenseNet-BC of ``depth`` when no name is given."""
    import torchvision

    if model is None:
        return torchvision_densenet_bc(depth, growth_rate, memory_efficient=memory_efficient)
    if model == "densenet264":  # torchvision has no builder for it; the same config as densenet_fast's
        return torchvision.models.DenseNet(32, (6, 12, 64, 48), 64, memory_efficient=memory_efficient)
    if model not in MODEL_NAMES:
        raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODEL_NAMES)}")
    return getattr(torchvision.models, model)(memory_efficient=memory_efficient)


def comparison_models(model: Optional[str], depth: Optional[int], backends: list[str], growth_rate: int = 12,
                      compile: bool = False) -> dict[str, nn.Module]:
    """torchvision (the baseline, first), torchvision memory_efficient, optionally torch.compile'd torchvision,
    and densenet_fast pinned to each backend, all with the same weights."""
    from .convert import convert

    tv = torchvision_model(model, depth, growth_rate)
    models: dict[str, nn.Module] = {BASELINE: tv}
    tv_me = torchvision_model(model, depth, growth_rate, memory_efficient=True)
    tv_me.load_state_dict(tv.state_dict())
    models["torchvision memory_efficient"] = tv_me
    if compile:
        import copy

        models["torchvision compiled"] = torch.compile(copy.deepcopy(tv))
    for backend in backends:
        models[f"densenet_fast[{backend}]"] = Pinned(convert(tv), backend)
    return models


# --- Memory of a whole training step --------------------------------------------------------------

def state_bytes(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """Bytes of what a training loop keeps between steps: parameters, buffers, gradients, optimizer state."""
    tensors = {t.data_ptr(): t for t in list(model.parameters()) + list(model.buffers())}
    tensors.update({p.grad.data_ptr(): p.grad for p in model.parameters() if p.grad is not None})
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors.update({t.data_ptr(): t for t in state.values() if isinstance(t, torch.Tensor)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def training_memory(fn: Callable[[], object], model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    device: torch.device) -> tuple[object, int]:
    """Run one training step ``fn`` and return (its result, the step's peak bytes).

    The peak counts what existed before the step (parameters, buffers, gradients, optimizer state:
    ``state_bytes``) plus the peak of what the step allocated (activations, saved tensors,
    temporaries, gradients and optimizer state created by a first step).
    """
    device = torch.device(device)
    out: list[object] = []
    before = state_bytes(model, optimizer)
    peak = peak_memory(lambda: out.append(fn()), device)
    return out[0], before + peak


# --- The command --------------------------------------------------------------------------------------

def validate(args: argparse.Namespace) -> None:
    """Every check of ``densenet-fast bench``'s input, before anything is built or measured; fills in
    ``args.model``, ``args.img_size``, ``args.device``, ``args.backends``, ``args.amp_dtype``."""
    err = f"{PROG} bench: error:"
    if args.model and args.depth:
        raise UsageError(f"{err} give a model name or --depth, not both")
    args.model = None if args.depth else (args.model or "densenet121")
    args.img_size = args.img_size or (32 if args.depth else 224)
    for depth in ([args.depth] if args.depth else []) + (args.plot_depths if args.plot else []):
        try:
            check_bc_depth(depth)
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
        models = comparison_models(model_name, depth, args.backends, args.growth_rate, args.compile)
        models = {name: m.to(device=device, dtype=dtype, memory_format=layout) for name, m in models.items()}
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
