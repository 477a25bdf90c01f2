"""The ``densenet-fast`` command (also ``python -m densenet_fast``).

    densenet-fast bench [densenet121 | --depth 100] [-b 8] [--img-size 224] [--amp] [--plot mem.png]
    densenet-fast train [--data-dir DIR] [--depth 16] [--epochs 6] [--checkpoint ckpt.pt] [--resume]
    densenet-fast max-depth [--budget 12GiB] [--growth-rate 12] [-b 64] [--img-size 32]
    densenet-fast                      # the README's main job: check, train, bench table

Flags follow timm's names (-b/--batch-size, --img-size, --amp/--amp-dtype, --channels-last, --device).
Bad input (an unknown model, a budget too small, an unwritable --json, ``--device cuda`` without
CUDA) is one line on stderr and exit status 2, found before any work starts. Anything else that goes
wrong is a traceback; a fatal signal prints Python's traceback too (faulthandler). The CPU profiler's
own log lines are filtered out where the profiler starts and stops (``densenet_fast/memory.py``),
never by hiding stderr.

This module is the parser and the dispatch. Each command's input checks (``validate``) and run are in
``<command>_command.py`` (bench_command, max_depth_command, train_command); the work they call is in
bench.py with comparison.py, max_depth.py and train.py, usable from Python without the command line.
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import sys
from typing import Optional

import torch

from . import bench_command, max_depth_command, train_command
from .comparison import MODEL_NAMES
from .ops.registry import _FACTORIES
from .tools import AMP_DTYPES, PROG, UsageError, default_device, parse_size
from .train import MODELS, TrainConfig


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every default in the help text (written out by hand where it depends on other flags), and the
    description as written."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or "") or action.nargs == 0:  # said already; or an on/off flag
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage; one line is clearer
        raise UsageError(f"{self.prog}: error: {message}")


class _ImpliesAmp(argparse.Action):
    """--amp-dtype X also turns --amp on (timm ignores it without --amp; silently ignoring it is worse)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.amp = True


def _version() -> str:
    from . import __version__

    return __version__


# --- Flags shared by the commands (timm's names) ------------------------------------------------------

def _add_batch_size(p: argparse.ArgumentParser, default: int) -> None:
    p.add_argument("-b", "--batch-size", type=int, default=default, help="images per training step")
    p.add_argument("--batch", type=int, dest="batch_size", help=argparse.SUPPRESS)  # the old spelling


def _add_img_size(p: argparse.ArgumentParser, default: Optional[int], help: str) -> None:
    p.add_argument("--img-size", type=int, default=default, metavar="SIDE", help=help)
    p.add_argument("--size", type=int, dest="img_size", help=argparse.SUPPRESS)  # the old spelling


def _add_device_and_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=default_device(), help="cpu, cuda or cuda:N; cuda where available")
    p.add_argument("--amp", action="store_true", help="autocast (mixed precision); the weights stay float32")
    p.add_argument("--amp-dtype", choices=list(AMP_DTYPES), default="bfloat16", action=_ImpliesAmp,
                   help="autocast dtype; implies --amp")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format for model and input")


def _add_backend(p: argparse.ArgumentParser, every: bool) -> None:
    p.add_argument("--backend", action="append", metavar="NAME",
                   help=f"only this densenet_fast backend: {', '.join(_FACTORIES)} (repeatable) (default: "
                   + ("every one available here)" if every else "the best one for the device)"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, formatter_class=_HelpFormatter,
                     description="Train torchvision-compatible DenseNets in a fraction of the memory. With no "
                     "command: a float64 check against torchvision, `train` with its defaults, then a `bench` table.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="{bench,train,max-depth}")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)

    p = command("bench", "peak memory and step time of a training step: ours (each backend) against torchvision")
    p.add_argument("model", nargs="?", choices=MODEL_NAMES, help="torchvision model (default: densenet121)")
    p.add_argument("--depth", type=int, help="a DenseNet-BC of this depth (6n+4) instead of a named model")
    p.add_argument("--growth-rate", type=int, default=12, help="k of --depth and of the plot's depth panel")
    _add_batch_size(p, 8)
    _add_img_size(p, None, "image side (default: 224, or 32 with --depth)")
    p.add_argument("--dtype", choices=list(bench_command.DTYPES), default="float32", help="dtype of weights and input")
    _add_device_and_precision(p)
    p.add_argument("--rounds", type=int, default=5, help="timed steps per model at least; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    p.add_argument("--max-time", type=float, default=60.0, metavar="SECONDS",
                   help="more timed rounds, up to this many seconds of them, until every IQR is < 10%% of its "
                   "median (0: exactly --rounds)")
    p.add_argument("--compile", action="store_true", help="also torch.compile'd torchvision")
    _add_backend(p, every=True)
    p.add_argument("--json", metavar="FILE", help="config and results")
    p.add_argument("--csv", metavar="FILE", help="results, one row per model")
    p.add_argument("--plot", metavar="FILE.png", help="memory against depth and against batch (needs matplotlib)")
    p.add_argument("--plot-depths", type=int, nargs="+", default=[40, 100, 160, 250], help="depth panel's depths")
    p.add_argument("--plot-batch", type=int, default=16, help="batch of the depth panel")
    p.add_argument("--plot-size", type=int, default=32, help="image side of the depth panel")
    p.add_argument("--plot-batches", type=int, nargs="+", default=[1, 2, 4, 8], help="batch panel's batches")
    p.set_defaults(validate=bench_command.validate, run=bench_command.run)

    p = command("train", "train a DenseNet: on scikit-learn's digits, an ImageFolder directory or CIFAR-10")
    p.add_argument("--data-dir", metavar="DIR", help="an ImageFolder directory (DIR/train, DIR/val) or torchvision's "
                   "CIFAR-10 (DIR/cifar-10-batches-py); none: scikit-learn's digits")
    p.add_argument("--dataset", choices=["auto", "digits", "folder", "cifar10"], default="auto",
                   help="what --data-dir holds; auto: cifar10 if it has cifar-10-batches-py, else folder")
    p.add_argument("--model", choices=MODELS, default="densenet_bc",
                   help="densenet_bc: the CIFAR DenseNet-BC (--depth, --growth-rate); or an ImageNet DenseNet")
    p.add_argument("--depth", type=int, help="DenseNet-BC depth, 6n+4 (default: 16, or the checkpoint's)")
    p.add_argument("--growth-rate", type=int, help="DenseNet-BC k (default: 12, or the checkpoint's)")
    defaults = TrainConfig()
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="length of the cosine schedule")
    _add_batch_size(p, defaults.batch_size)
    p.add_argument("--lr", type=float, help="AdamW's base learning rate (default: 3e-3, or the checkpoint's)")
    _add_img_size(p, defaults.img_size, "image side the data is resized to")
    _add_device_and_precision(p)
    _add_backend(p, every=False)
    p.add_argument("-j", "--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data-loading processes for --data-dir (the digits are in memory)")
    p.add_argument("--checkpoint", metavar="PATH", help="write model, optimizer and epoch here after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint (a larger --epochs extends "
                   "the schedule)")
    p.add_argument("--seed", type=int, help="shuffling, augmentation, initial weights (default: 0, or the "
                   "checkpoint's)")
    p.add_argument("--json", metavar="FILE", help="per-epoch statistics")
    p.set_defaults(validate=train_command.validate, run=train_command.run)

    p = command("max-depth", "deepest DenseNet-BC whose training step fits in a memory budget")
    p.add_argument("--budget", type=parse_size, default="12GiB", help="e.g. 12GiB, 500MiB, 16GB")
    p.add_argument("--growth-rate", type=int, default=12, help="DenseNet-BC k")
    _add_batch_size(p, 64)
    _add_img_size(p, 32, "image side")
    p.add_argument("--device", default=default_device(), help="cpu, cuda or cuda:N; cuda where available")
    _add_backend(p, every=True)
    p.add_argument("--fit-depths", type=int, nargs="+", default=[40, 100, 250],
                   help="depths measured for the fit (at least 3)")
    p.add_argument("--verify-max-depth", type=int, help="check the fit at the answer or at most this depth "
                   "(default: 1000 on CPU, where a deeper step takes minutes; no limit on CUDA)")
    p.add_argument("--json", metavar="FILE", help="config and results")
    p.set_defaults(validate=max_depth_command.validate, run=max_depth_command.run)
    return parser


# --- The main job (no command) ----------------------------------------------------------------------

def check_against_torchvision() -> None:
    """densenet_fast against torchvision in float64: outputs, parameter gradients, running statistics."""
    import torchvision

    import densenet_fast

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


def main_job() -> int:
    """``make demo``: the float64 check, then ``train`` and ``bench`` with their defaults."""
    print("## 1. float64 check against torchvision\n")
    check_against_torchvision()
    for step, argv in (("2. densenet-fast train", ["train"]), ("3. densenet-fast bench", ["bench"])):
        print(f"\n## {step}\n", flush=True)
        status = main(argv)
        if status:
            return status
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # A fatal signal (a segfault in a native extension) prints the Python traceback on stderr.
    enabled_here = not faulthandler.is_enabled() and sys.__stderr__ is not None
    if enabled_here:
        faulthandler.enable(file=sys.__stderr__)
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        if args.command is None:
            return main_job()
        args.validate(args)  # every bad input, before any work
        return args.run(args)
    except UsageError as err:
        print(err, file=sys.stderr)
        return 2
    except SystemExit as done:  # --help, --version; or a message
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
            return 1
        return done.code or 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        if enabled_here:
            faulthandler.disable()


if __name__ == "__main__":
    sys.exit(main())
