"""The per-layer op interface (``interface.py``), its backends (``torch_backend.py``,
``cpp_backend.py`` and ``composite_backend.py`` on the compiled extension's ops
(``extension_ops.py``), ``triton_backend.py`` with its kernels in ``triton/``) and the registry
that picks one (``registry.py``)."""
from .registry import (
    available_backends,
    backend_for,
    backend_name_for,
    backend_named,
    get_backend_name,
    register_backend,
    serving_backends,
    set_backend,
    use_backend,
)

__all__ = ["available_backends", "backend_for", "backend_name_for", "backend_named", "get_backend_name",
           "register_backend", "serving_backends", "set_backend", "use_backend"]
