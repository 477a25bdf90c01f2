"""The README's main job (``make demo``, ``python -m densenet_fast``): a float64 check against torchvision,
``densenet-fast train`` with its defaults, then the ``densenet-fast bench`` table with its defaults."""
from __future__ import annotations

import torch
import torchvision

import densenet_fast


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
    from .cli import main as cli

    print("## 1. float64 check against torchvision\n")
    _check_against_torchvision()
    for step, argv in (("2. densenet-fast train", ["train"]), ("3. densenet-fast bench", ["bench"])):
        print(f"\n## {step}\n", flush=True)
        status = cli(argv)
        if status:
            raise SystemExit(status)


if __name__ == "__main__":
    main()
