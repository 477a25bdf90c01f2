"""The README's main job (for now): build a model, check it against torchvision, print a memory table."""
from __future__ import annotations

import torch
import torchvision

import densenet_fast
from densenet_fast.bench import compare_steps, format_table


def _check_against_torchvision() -> None:
    torch.manual_seed(0)
    tv = torchvision.models.DenseNet(12, (3, 3, 3), 24, num_classes=10).double()
    fast = densenet_fast.convert(tv)
    x = torch.randn(4, 3, 64, 48, dtype=torch.double)
    out_tv, out_fast = tv(x), fast(x)
    grads_tv = torch.autograd.grad(out_tv.sum(), list(tv.parameters()))
    grads_fast = torch.autograd.grad(out_fast.sum(), list(fast.parameters()))
    out_err = (out_tv - out_fast).abs().max().item()
    grad_err = max((a - b).abs().max().item() for a, b in zip(grads_tv, grads_fast))
    stats_err = max((a.double() - b.double()).abs().max().item()
                    for a, b in zip(tv.state_dict().values(), fast.state_dict().values()))
    print(f"float64 check against torchvision ({densenet_fast.available_backends()} available): "
          f"outputs {out_err:.1e}, parameter grads {grad_err:.1e}, running stats {stats_err:.1e}")
    if max(out_err, grad_err, stats_err) > 1e-9:
        raise SystemExit("densenet_fast does not match torchvision")


def main() -> None:
    _check_against_torchvision()
    torch.manual_seed(0)
    x = torch.randn(4, 3, 128, 128)
    tv = torchvision.models.densenet121()
    models = {"torchvision": tv, "torchvision memory_efficient": torchvision.models.densenet121(memory_efficient=True),
              "densenet_fast": densenet_fast.convert(tv)}
    print(f"\nDenseNet-121 training step, batch {x.shape[0]}, {x.shape[2]}x{x.shape[3]}, CPU float32 "
          f"(full table: python benchmarks/core_benchmark.py)\n")
    print(format_table(compare_steps(models, x, rounds=2), "torchvision"))


if __name__ == "__main__":
    main()
