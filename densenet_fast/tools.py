"""What the ``densenet-fast`` commands share: the one-line error, sizes, the machine line, output files.

Every check here runs before a command starts working, so bad input costs nothing but one line.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import platform
import re
import tempfile
from pathlib import Path
from types import ModuleType

import torch

PROG = "densenet-fast"
CLI_EXTRA = "densenet-fast[cli]"


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit status 2, before any work starts."""


def require(module: str, what: str, package: str | None = None) -> ModuleType:
    """Import ``module`` (a dependency of the ``cli`` extra), or a UsageError that names the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{PROG}: error: {what} needs {package or module.split('.')[0]}, which is not installed: "
                         f"pip install '{CLI_EXTRA}'") from None


def check_output_path(path: str | None, flag: str, make_folder: bool = False) -> None:
    """A file the command writes later: its folder (with ``make_folder``, its nearest existing ancestor)
    must exist and take a new file now, tried with a temporary file (``os.access`` says yes to root)."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{PROG}: error: {flag} {path}: is a directory; expected a file path")
    folder = target.absolute().parent
    while make_folder and not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"{PROG}: error: {flag} {path}: folder {target.parent} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".densenet-fast-check-"):
            pass
    except OSError as err:
        raise UsageError(f"{PROG}: error: {flag} {path}: folder {folder} is not writable ({err.strerror})") from None
    if target.exists() and not os.access(target, os.W_OK):
        raise UsageError(f"{PROG}: error: {flag} {path}: not writable")


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


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def write_csv(path: str, rows: list[dict]) -> None:
    fields = [k for k in rows[0] if not isinstance(rows[0][k], list)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# --- Devices, backends, autocast --------------------------------------------------------------------

def default_device() -> str:
    """timm's default: cuda where there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str) -> torch.device:
    """The torch device for ``name``; ValueError (one clear line) when it can't be used."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    return device


def check_device(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except ValueError as err:
        raise UsageError(f"{PROG}: error: {err}") from None


def check_backends(requested: list[str] | None, device: torch.device, dtype: torch.dtype,
                   every: bool = True) -> list[str]:
    """The requested backends (default: every available one that serves ``device`` without a pin,
    ``serving_backends``; with ``every=False`` none: automatic choice), each of which must be known,
    built here, and compute on ``dtype`` tensors on ``device``; an available backend that can't is
    skipped with a note on stderr when none was requested."""
    import sys

    from .ops import backend_named, serving_backends, use_backend

    for name in requested or []:
        try:
            with use_backend(name):
                pass
        except ValueError:  # not a backend of this package at all
            from .ops.registry import _FACTORIES

            raise UsageError(f"{PROG}: error: unknown backend {name!r}; expected one of "
                             f"{', '.join(sorted(_FACTORIES))}") from None
        except RuntimeError as err:  # one of ours, not built or not loadable in this installation
            raise UsageError(f"{PROG}: error: {str(err).splitlines()[0]}") from None
    names = requested or (serving_backends(device.type) if every else [])
    usable = []
    probe = torch.empty(2, 1, 1, 1, device=device, dtype=dtype)
    for name in names:  # each known and available here (checked above, or serving_backends')
        reason = backend_named(name).supports(probe)
        if reason is None:
            usable.append(name)
        elif requested:
            raise UsageError(f"{PROG}: error: backend {name!r} does not compute on {dtype} tensors on "
                             f"{device.type}: {str(reason).splitlines()[0]}")
        else:
            print(f"{PROG}: skipping backend {name!r} for {dtype} on {device.type}: {reason}", file=sys.stderr)
    if every and not usable:
        raise UsageError(f"{PROG}: error: no densenet_fast backend computes on {dtype} tensors on {device.type}")
    return usable


AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_dtype(amp: bool, amp_dtype: str) -> torch.dtype | None:
    """timm's --amp / --amp-dtype: None (no autocast), or the autocast dtype."""
    if amp_dtype not in AMP_DTYPES:
        raise UsageError(f"{PROG}: error: --amp-dtype must be one of {', '.join(AMP_DTYPES)}, got {amp_dtype!r}")
    return AMP_DTYPES[amp_dtype] if amp else None
