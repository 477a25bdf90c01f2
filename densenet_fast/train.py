"""``densenet-fast train``: a DenseNet trained end to end, on scikit-learn's digits by default (no
download), or on an ImageFolder directory or CIFAR-10 (``densenet_fast/data.py``).

The model is ``densenet_fast.densenet_bc`` with its CIFAR stem (or a named ImageNet DenseNet with
``model``), trained with AdamW on a cosine learning-rate schedule over ``epochs``. Every epoch's
shuffling and augmentation come from (seed, epoch), so a run resumed from a checkpoint sees the
same batches as an uninterrupted one. The learning rate of an epoch is the closed-form cosine of
(epoch, epochs): resuming with a larger ``epochs`` continues on the longer schedule, at the rate
it has at the checkpoint's epoch.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader

from .comparison import min_image_size
from .data import DATASETS, Data, open_data
from .memory import MiB, training_memory
from .tools import AMP_DTYPES, default_device, resolve_device

MODELS = ("densenet_bc", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264")
DEFAULT_DEPTH, DEFAULT_GROWTH_RATE, DEFAULT_LR, DEFAULT_SEED = 16, 12, 3e-3, 0


@dataclass
class TrainConfig:
    model: str = "densenet_bc"
    depth: Optional[int] = None  # densenet_bc only; None: 16, or the checkpoint's
    growth_rate: Optional[int] = None  # densenet_bc only; None: 12, or the checkpoint's
    epochs: int = 6
    batch_size: int = 32
    lr: Optional[float] = None  # None: 3e-3, or the checkpoint's
    device: str = field(default_factory=default_device)
    amp: bool = False
    amp_dtype: str = "bfloat16"
    channels_last: bool = False
    backend: Optional[str] = None  # pin a densenet_fast backend (None: the best for the device)
    dataset: str = "auto"
    data_dir: Optional[str] = None
    img_size: int = 32
    workers: int = 0
    checkpoint: Optional[str] = None  # where to write (and with resume, read) the checkpoint
    resume: bool = False
    seed: Optional[int] = None  # None: 0, or the checkpoint's


@dataclass
class EpochStats:
    epoch: int
    lr: float
    loss: float
    train_accuracy: float
    test_accuracy: float
    seconds: float
    peak_bytes: int


@dataclass
class Run:
    """Everything ``fit`` needs, built and checked by ``prepare``."""
    config: TrainConfig
    device: torch.device
    amp: Optional[torch.dtype]
    data: Data
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    start_epoch: int
    resumed_lr: Optional[float]  # the checkpoint's last learning rate, when resuming


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """The learning rate of (0-based) ``epoch`` of ``epochs``: CosineAnnealingLR's closed form."""
    return base_lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def _architecture(config: TrainConfig, state: Optional[dict]) -> None:
    """Fill in depth and growth rate (defaults, or the checkpoint's), refusing a conflict with the checkpoint."""
    if config.model not in MODELS:
        raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {config.model!r}")
    if config.model != "densenet_bc" and (config.depth is not None or config.growth_rate is not None):
        raise ValueError(f"--depth and --growth-rate describe --model densenet_bc, not {config.model}")
    if state is not None:
        saved = {"model": state["model_name"], "depth": state["depth"], "growth_rate": state["growth_rate"]}
        for key, value in saved.items():
            if getattr(config, key) is not None and key != "model" and getattr(config, key) != value:
                raise ValueError(f"--{key.replace('_', '-')} {getattr(config, key)}: the checkpoint "
                                 f"{config.checkpoint} has {value}; drop the flag to resume it")
        if config.model != saved["model"]:
            raise ValueError(f"--model {config.model}: the checkpoint {config.checkpoint} is a {saved['model']}")
        config.depth, config.growth_rate = saved["depth"], saved["growth_rate"]
    elif config.model == "densenet_bc":
        config.depth = DEFAULT_DEPTH if config.depth is None else config.depth
        config.growth_rate = DEFAULT_GROWTH_RATE if config.growth_rate is None else config.growth_rate


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    from . import builders as models

    if config.model == "densenet_bc":
        return models.densenet_bc(config.depth, config.growth_rate, num_classes=num_classes)
    return getattr(models, config.model)(num_classes=num_classes)


def prepare(config: TrainConfig) -> Run:
    """Check ``config``, read the checkpoint and the data set's index, build the model: a ValueError (one
    line) for any bad input, before the first training step."""
    device = resolve_device(config.device)
    if config.amp_dtype not in AMP_DTYPES:
        raise ValueError(f"--amp-dtype must be one of {', '.join(AMP_DTYPES)}, got {config.amp_dtype!r}")
    amp = AMP_DTYPES[config.amp_dtype] if config.amp else None
    for name in ("epochs", "batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if config.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {config.workers}")
    if config.growth_rate is not None and config.growth_rate < 1:
        raise ValueError(f"--growth-rate must be at least 1, got {config.growth_rate}")
    if config.lr is not None and not config.lr > 0:
        raise ValueError(f"--lr must be positive, got {config.lr}")
    smallest = min_image_size(None if config.model == "densenet_bc" else config.model)  # batches hold 2+ images
    if config.img_size < smallest:
        raise ValueError(f"--img-size {config.img_size} is too small for {config.model}: at least {smallest}")
    if config.resume and not config.checkpoint:
        raise ValueError("--resume needs --checkpoint PATH")
    if config.dataset not in DATASETS:
        raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {config.dataset!r}")

    state = None
    if config.resume:
        if not Path(config.checkpoint).is_file():
            raise ValueError(f"--resume: no checkpoint at {config.checkpoint}")
        state = torch.load(config.checkpoint, map_location=device, weights_only=True)
        if "model_name" not in state:
            raise ValueError(f"--resume: {config.checkpoint} is not a densenet-fast train checkpoint")
        if state["epoch"] > config.epochs:
            raise ValueError(f"--epochs {config.epochs}: the checkpoint {config.checkpoint} has already trained "
                             f"{state['epoch']} epochs; give --epochs {state['epoch']} or more")
        config.lr = state["lr"] if config.lr is None else config.lr
        config.seed = state["seed"] if config.seed is None else config.seed
    config.lr = DEFAULT_LR if config.lr is None else config.lr
    config.seed = DEFAULT_SEED if config.seed is None else config.seed
    _architecture(config, state)
    if config.backend is not None:
        from .ops import backend_named

        backend_named(config.backend)  # known and built here (fit pins it for its own duration)

    data = open_data(config.dataset, config.data_dir, config.img_size)
    if state is not None and list(state["classes"]) != data.classes:
        raise ValueError(f"--resume: the checkpoint {config.checkpoint} was trained on {len(state['classes'])} "
                         f"classes {state['classes'][:5]}..., this data set has {len(data.classes)}")
    torch.manual_seed(config.seed)
    model = build_model(config, len(data.classes)).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # AdamW: on the digits it learned faster than SGD (test accuracy 78% vs 56% after one epoch).
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    resumed_lr = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        resumed_lr = optimizer.param_groups[0]["lr"]
    return Run(config, device, amp, data, model, optimizer, scaler, int(state["epoch"]) if state else 0, resumed_lr)


def _save(path: str, run: Run, epoch: int) -> None:
    config = run.config
    state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "epoch": epoch,
             "epochs": config.epochs, "model_name": config.model, "depth": config.depth,
             "growth_rate": config.growth_rate, "classes": run.data.classes, "lr": config.lr, "seed": config.seed}
    if run.scaler.is_enabled():
        state["scaler"] = run.scaler.state_dict()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: an interrupted save never leaves a truncated checkpoint behind.
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's batches of indices: a permutation that depends only on (seed, epoch)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        last = batches.pop()
        batches[-1] = batches[-1] + last  # BN cannot train on a batch of one image
    return batches


def _evaluate(run: Run, batch_size: int = 256) -> float:
    run.model.eval()
    correct = total = 0
    loader = DataLoader(run.data.test, batch_size=batch_size, num_workers=run.config.workers)
    with torch.no_grad(), _autocast(run):
        for xb, yb in loader:
            logits = run.model(_to_device(run, xb))
            correct += (logits.argmax(1).cpu() == yb).sum().item()
            total += len(yb)
    return correct / total


def _autocast(run: Run):
    return torch.autocast(run.device.type, dtype=run.amp or torch.bfloat16, enabled=run.amp is not None)


def _to_device(run: Run, x: Tensor) -> Tensor:
    layout = torch.channels_last if run.config.channels_last else torch.contiguous_format
    return x.to(run.device, memory_format=layout)


def fit(run: Run, log: Callable[[str], None] = print) -> list[EpochStats]:
    """Train ``run`` from its start epoch to ``config.epochs``; ``log`` gets one line per epoch and the result."""
    from tqdm import tqdm

    from .ops import use_backend

    config, model, optimizer, scaler = run.config, run.model, run.optimizer, run.scaler
    pinned = contextlib.ExitStack()
    if config.backend is not None:
        pinned.enter_context(use_backend(config.backend))  # pinned for this run only
    what = (f"DenseNet-BC depth {config.depth}, k {config.growth_rate}" if config.model == "densenet_bc"
            else config.model)
    if run.start_epoch:
        log(f"resumed from {config.checkpoint} after epoch {run.start_epoch} ({what}), whose learning rate was "
            f"{run.resumed_lr:.3g}; epoch {run.start_epoch + 1} runs at "
            f"{cosine_lr(config.lr, run.start_epoch, config.epochs):.3g}, on the cosine over {config.epochs} epochs")
    log(f"{what}, {sum(p.numel() for p in model.parameters()):,} parameters; {run.data.description} at "
        f"{config.img_size}x{config.img_size}; {run.device}" + (f", autocast {config.amp_dtype}" if run.amp else "")
        + (", channels_last" if config.channels_last else ""))

    def step(xb: Tensor, yb: Tensor) -> tuple[float, int]:
        with _autocast(run):
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb)
        optimizer.zero_grad(set_to_none=False)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.item(), (logits.argmax(1) == yb).sum().item()

    history = []
    try:
        for epoch in range(run.start_epoch, config.epochs):
            lr = cosine_lr(config.lr, epoch, config.epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            torch.manual_seed(config.seed * 1000 + epoch)  # the epoch's augmentation (and workers' seeds)
            batches = epoch_batches(len(run.data.train), config.batch_size, config.seed, epoch)
            loader = DataLoader(run.data.train, batch_sampler=batches, num_workers=config.workers,
                                pin_memory=run.device.type == "cuda")
            total_loss = correct = seen = 0.0
            start = time.perf_counter()
            peak = 0
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False,
                       dynamic_ncols=True)
            for i, (xb, yb) in enumerate(bar):
                xb, yb = _to_device(run, xb), yb.to(run.device)
                if i == 0:
                    # The first step of each epoch is measured (see memory.training_memory for what counts).
                    # training_memory calls the lambda before it returns: this iteration's batch.
                    (loss, hits), peak = training_memory(lambda: step(xb, yb),  # noqa: B023
                                                         model, optimizer, run.device)
                else:
                    loss, hits = step(xb, yb)
                total_loss += loss * len(yb)
                correct += hits
                seen += len(yb)
                bar.set_postfix(loss=f"{loss:.3f}")
            bar.close()
            if run.data.name == "digits":
                # 43 steps an epoch (batch 32) leave the running statistics lagging: recompute them.
                with _autocast(run):
                    update_bn(DataLoader(run.data.train, batch_size=256), model, device=run.device)
            seconds = time.perf_counter() - start
            stats = EpochStats(epoch + 1, lr, total_loss / seen, correct / seen, _evaluate(run), seconds, peak)
            history.append(stats)
            log(f"epoch {stats.epoch}/{config.epochs}: lr {lr:.3g}, loss {stats.loss:.4f}, train accuracy "
                f"{stats.train_accuracy:.4f}, test accuracy {stats.test_accuracy:.4f}, {stats.seconds:.1f} s, "
                f"peak memory {peak / MiB:.1f} MiB")
            if config.checkpoint:
                _save(config.checkpoint, run, epoch + 1)
        if not history:
            log(f"nothing to train: the checkpoint is already at epoch {run.start_epoch} of {config.epochs}")
        log(f"test accuracy: {history[-1].test_accuracy if history else _evaluate(run):.4f}")
    finally:
        pinned.close()
    return history


def train(config: TrainConfig, log: Callable[[str], None] = print) -> list[EpochStats]:
    """Train (or resume) and return per-epoch statistics."""
    return fit(prepare(config), log)
