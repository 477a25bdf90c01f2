"""The backend registry: which implementation of the op interface (``interface.py``) runs a block.

``set_backend(name)``, a ``with use_backend(name):`` block, or the environment variable
``DENSENET_FAST_BACKEND`` pins one backend; otherwise the best backend available for the tensors'
device is used.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Optional

import torch
from torch import Tensor

from .interface import Backend
from .torch_backend import TorchBackend


def _cpp_backend() -> Backend:
    # The compiled extension (csrc/); ImportError when the package was installed without it, or
    # with one built for another torch (densenet_fast/_extension.py).
    from .cpp_backend import CppBackend

    return CppBackend()


def _composite_backend() -> Backend:
    # The same extension's per-channel kernels around ATen's convolutions; ImportError as for cpp.
    from .composite_backend import CompositeBackend

    return CompositeBackend()


def _triton_backend() -> Backend:
    from .triton_backend import TritonBackend

    return TritonBackend()


# name -> factory; a factory raises ImportError/RuntimeError when the backend can't be used here.
_FACTORIES: dict[str, Callable[[], Backend]] = {
    "torch": TorchBackend, "cpp": _cpp_backend, "composite": _composite_backend, "triton": _triton_backend}
# Preference order per device type, best first. On CPU "composite" (which runs there too, for the
# tests) only when pinned: the fused "cpp" is faster.
_PREFERENCE = {"cpu": ["cpp", "torch"], "cuda": ["triton", "composite", "torch"]}
_ENV_VAR = "DENSENET_FAST_BACKEND"

_instances: dict[str, Backend] = {}
_unavailable: dict[str, str] = {}
_selected: Optional[str] = None


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Make a backend selectable by ``name`` (used by the compiled and Triton backends)."""
    _FACTORIES[name] = factory
    _instances.pop(name, None)
    _unavailable.pop(name, None)


def _instance(name: str) -> Optional[Backend]:
    if name in _instances:
        return _instances[name]
    if name not in _FACTORIES or name in _unavailable:
        return None
    try:
        _instances[name] = _FACTORIES[name]()
    except (ImportError, RuntimeError, OSError) as err:
        _unavailable[name] = f"{type(err).__name__}: {err}"
        return None
    return _instances[name]


def available_backends() -> list[str]:
    """Names of the backends that can run in this installation."""
    return [name for name in _FACTORIES if _instance(name) is not None]


def serving_backends(device_type: str) -> list[str]:
    """Names of the available backends that serve tensors on ``device_type`` without a pin, best
    first: the automatic choice takes the first that supports the tensors. What the benchmarks
    compare; a backend outside this list (``composite`` on CPU, there for the tests) runs only pinned."""
    return [name for name in _PREFERENCE.get(device_type, ["torch"]) if _instance(name) is not None]


def _check_name(name: str) -> None:
    if name not in _FACTORIES:
        raise ValueError(
            f"unknown densenet_fast backend {name!r}; expected one of {sorted(_FACTORIES)}"
        )
    if _instance(name) is None:
        raise RuntimeError(
            f"densenet_fast backend {name!r} is not available here ({_unavailable.get(name, 'unknown reason')}); "
            f"available backends: {available_backends()}"
        )


def set_backend(name: Optional[str]) -> None:
    """Pin the backend for every block (``None`` restores automatic choice per device)."""
    global _selected
    if name is not None:
        _check_name(name)
    _selected = name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Pin the backend ``name`` (``None``: automatic choice) for the blocks run inside the ``with``
    block; the pin that was there before (set_backend's or none) comes back after it, also on error."""
    global _selected
    previous = _selected
    set_backend(name)
    try:
        yield
    finally:
        _selected = previous


def get_backend_name() -> Optional[str]:
    """The pinned backend: set_backend's, else the environment variable's, else None (automatic)."""
    return _selected if _selected is not None else (os.environ.get(_ENV_VAR) or None)


def backend_named(name: str) -> Backend:
    """The backend called ``name``; raises if it is unknown or not available here."""
    _check_name(name)
    return _instances[name]


def backend_name_for(device: torch.device, dtype: torch.dtype) -> str:
    """Name of the backend for tensors on ``device`` of ``dtype``.

    A constant to torch.compile: a compiled model keeps the backend it was traced with.
    """
    return backend_for(torch.empty(0, device=device, dtype=dtype)).name


# What @torch._dynamo.assume_constant_result does (it only sets this attribute), without the
# decorator's cost: importing torch._dynamo takes ~1.4 s, most of `import densenet_fast`.
# tests/test_package.py checks the decorator still marks a function exactly this way.
backend_name_for._dynamo_marked_constant = True  # type: ignore[attr-defined]


def backend_for(x: Tensor) -> Backend:
    """The backend that computes on tensors like ``x``; raises if a pinned one can't."""
    name = get_backend_name()
    if name is not None:
        _check_name(name)
        backend = _instances[name]
        backend.check_tensors(x)
        return backend
    for candidate in serving_backends(x.device.type):
        backend = _instances[candidate]
        if backend.supports(x) is None:
            return backend
    raise RuntimeError(f"no densenet_fast backend can compute on {x.device.type} tensors of dtype {x.dtype}")
