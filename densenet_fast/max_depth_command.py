"""``densenet-fast max-depth``: its input checks (``validate``: the smallest DenseNet-BC must fit the
budget) and its run: max_depth.py's fit for each model kind, printed as a table, optionally as JSON.
"""
from __future__ import annotations

import argparse

import torch

from . import max_depth
from .comparison import fast_name, min_image_size
from .tools import PROG, UsageError, check_backends, check_device, check_output_path, human, machine, write_json


def validate(args: argparse.Namespace) -> None:
    """Every check of ``densenet-fast max-depth``'s input before the fit: the smallest DenseNet-BC must fit the
    budget, by the architecture's floor (instant) and then measured (a fraction of a second per kind)."""
    from .builders import bc_layers_per_block  # torchvision's weight enums: imported when a command runs

    err = f"{PROG} max-depth: error:"
    try:
        for d in args.fit_depths:
            bc_layers_per_block(d)
    except ValueError:
        raise UsageError(f"{err} --fit-depths needs at least 3 different depths of the form 6n+4") from None
    if len(set(args.fit_depths)) < 3:
        raise UsageError(f"{err} --fit-depths needs at least 3 different depths of the form 6n+4")
    # On CPU the step is measured at batch 1 (see _measured_batches): the image size must do for it.
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--img-size", args.img_size, min_image_size(
            None, batch=1)), ("--growth-rate", args.growth_rate, 1)):
        if value < least:
            raise UsageError(f"{err} {flag} must be at least {least}, got {value}")
    check_output_path(args.json, "--json")
    args.device = check_device(args.device)
    args.kinds = [fast_name(b) for b in check_backends(args.backend, args.device, torch.float32)] + list(
        max_depth.MAX_DEPTH_KINDS)
    what = f"DenseNet-BC depth 10 (k={args.growth_rate}, batch {args.batch_size}, {args.img_size}x{args.img_size})"
    floor = max_depth.floor_bytes(args.growth_rate, args.batch_size, args.img_size)
    if floor > args.budget:
        raise UsageError(f"{err} budget {human(args.budget)} is too small: the smallest model, {what}, needs more "
                         f"than {human(floor)} (parameters, input and its first block's features)")
    smallest = min(max_depth.smallest_total(kind, args.growth_rate, args.batch_size, args.img_size, args.device)
                   for kind in args.kinds)
    if smallest > args.budget:
        raise UsageError(f"{err} budget {human(args.budget)} is too small: the smallest model, {what}, needs "
                         f"{human(smallest)} with the leanest of {', '.join(args.kinds)}")


def run(args: argparse.Namespace) -> int:
    """``densenet-fast max-depth`` after ``validate``."""
    from tqdm import tqdm

    device = args.device
    estimate = device.type == "cpu" and args.batch_size > 2
    results = []
    bar = tqdm(args.kinds, desc="max-depth", unit="model", leave=False, dynamic_ncols=True)
    for kind in bar:
        bar.set_description(kind)
        verify_cap = args.verify_max_depth or (1000 if device.type == "cpu" else None)
        results.append(max_depth.max_depth(kind, args.budget, args.growth_rate, args.batch_size, args.img_size, device,
                                 tuple(args.fit_depths), verify_cap, progress=bar.set_postfix_str))
    bar.close()

    print(f"Deepest DenseNet-BC (k={args.growth_rate}) whose training step fits in {human(args.budget)}: batch "
          f"{args.batch_size}, {args.img_size}x{args.img_size}, float32, SGD with momentum; {machine(device)}\n")
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
              f"{args.batch_size} (the per-image part scales with the batch, the rest doesn't); the fit check is at "
              "batch 1.")
    if args.json:
        write_json(args.json, {"config": {"budget_bytes": args.budget, "growth_rate": args.growth_rate,
                                          "batch": args.batch_size, "img_size": args.img_size, "device": str(device),
                                          "estimate": estimate, "machine": machine(device)},
                               "results": [dict(vars(r), total_bytes=r.total_bytes) for r in results]})
    return 0
