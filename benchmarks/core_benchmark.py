"""Memory and speed of densenet_fast against torchvision, measured in one run.

    python benchmarks/core_benchmark.py            # DenseNet-121, batch 8, 224x224, CPU float32
    python benchmarks/core_benchmark.py --quick    # smaller shapes, for a demo

Prints markdown tables: a training step of DenseNet-121 (peak memory, median step time, ratios
against torchvision's memory_efficient=False), then the activation peak of DenseNet-BC (k=12) at
two depths, whose ratio tells how memory grows with depth.
"""
from __future__ import annotations

import argparse
import platform

import torch
import torchvision

import densenet_fast
from densenet_fast.bench import MiB, compare_steps, format_table
from densenet_fast.comparison import (
    BASELINE,
    MEMORY_EFFICIENT,
    backends_for,
    comparison_models,
    torchvision_densenet_bc,
)
from densenet_fast.memory import activation_peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per model (median reported)")
    parser.add_argument("--depths", type=int, nargs=2, default=(100, 250))
    parser.add_argument("--depth-batch", type=int, default=16)
    parser.add_argument("--depth-size", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="batch 2, 112x112, depths 40 and 100, 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.size, args.rounds, args.depths, args.depth_batch, args.depth_size = 2, 112, 2, (40, 100), 4, 32

    torch.manual_seed(0)
    print(f"# densenet_fast {densenet_fast.__version__}, torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, CPU float32\n")

    x = torch.randn(args.batch, 3, args.size, args.size)
    models = comparison_models("densenet121", None, backends_for(x))
    print(f"## DenseNet-121 training step, batch {args.batch}, {args.size}x{args.size}\n")
    results = compare_steps(models, x, rounds=args.rounds)
    print(format_table(results, BASELINE))
    base = {r.name: r for r in results}
    tv, tv_me = base[BASELINE], base[MEMORY_EFFICIENT]
    print()
    for r in results:
        if r.name.startswith("densenet_fast"):
            print(f"{r.name}: memory {r.peak_bytes / tv.peak_bytes:.3f}x torchvision (target <= 0.25), "
                  f"{r.peak_bytes / tv_me.peak_bytes:.3f}x memory_efficient (target <= 0.5), "
                  f"time {r.step_time / tv.step_time:.3f}x torchvision (target <= 1.15)")

    d0, d1 = args.depths
    print(f"\n## DenseNet-BC (k=12) activation peak, batch {args.depth_batch}, {args.depth_size}x{args.depth_size}\n")
    print(f"| model | depth {d0} | depth {d1} | growth |\n|---|---|---|---|")
    xd = torch.randn(args.depth_batch, 3, args.depth_size, args.depth_size)
    densenet_fast.set_backend(None)
    for name, make in ((BASELINE, lambda d: torchvision_densenet_bc(d)),
                       ("densenet_fast", lambda d: densenet_fast.densenet_bc(d))):
        peaks = [activation_peak(make(d), xd) for d in (d0, d1)]
        print(f"| {name} | {peaks[0] / MiB:.1f} MiB | {peaks[1] / MiB:.1f} MiB | {peaks[1] / peaks[0]:.2f}x |")
    print("\n(target: densenet_fast grows <= 2.8x from depth 100 to 250)")


if __name__ == "__main__":
    main()
