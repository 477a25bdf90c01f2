"""``densenet-fast train``: its input checks (``validate``: the config, backend, output paths and
data, prepared before the first epoch) and its run: train.py's ``fit``, optionally written as JSON.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict

import torch

from .data import resolve_dataset
from .tools import PROG, UsageError, check_backends, check_device, check_output_path, require, write_json
from .train import TrainConfig, prepare


def validate(args: argparse.Namespace) -> None:
    """Every check of ``densenet-fast train``'s input, before the first epoch; fills in ``args.prepared``."""
    config = TrainConfig(model=args.model, depth=args.depth, growth_rate=args.growth_rate, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, device=args.device, amp=args.amp,
                         amp_dtype=args.amp_dtype, channels_last=args.channels_last,
                         backend=args.backend[-1] if args.backend else None, dataset=args.dataset,
                         data_dir=args.data_dir, img_size=args.img_size, workers=args.workers,
                         checkpoint=args.checkpoint, resume=args.resume, seed=args.seed)
    if args.backend and len(args.backend) > 1:
        raise UsageError(f"{PROG} train: error: one --backend trains the model, got {args.backend}")
    if args.backend:
        check_backends(args.backend, check_device(args.device), torch.float32, every=False)
    check_output_path(args.json, "--json")
    check_output_path(args.checkpoint, "--checkpoint", make_folder=True)
    try:
        if resolve_dataset(args.dataset, args.data_dir) == "digits":
            require("sklearn", "training on the digits (no --data-dir)", "scikit-learn")
        args.prepared = prepare(config)
    except ValueError as err:
        raise UsageError(f"{PROG} train: error: {err}") from None


def run(args: argparse.Namespace) -> int:
    """``densenet-fast train`` after ``validate``."""
    from tqdm import tqdm

    from .train import fit  # looked up at run time (the CLI tests replace it)

    history = fit(args.prepared, log=tqdm.write)
    if args.json:
        write_json(args.json, {"config": asdict(args.prepared.config), "epochs": [asdict(h) for h in history]})
    return 0
