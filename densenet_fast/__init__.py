"""densenet_fast: torchvision's DenseNets, trained in a fraction of the memory.

    model = densenet_fast.densenet121()           # instead of torchvision.models.densenet121()
    model.load_state_dict(tv_model.state_dict())  # same names, both ways
"""
from . import reference
from .convert import convert
from .fusion import FallbackError, get_fallback, reset_fallback_warnings, set_fallback
from .memory import peak_memory
from .models import DenseNet
from .ops import available_backends, get_backend_name, set_backend, use_backend
from .sync_batchnorm import SyncBatchNorm2d, convert_sync_batchnorm

# The builders carry torchvision's weight enums (for get_model_weights): importing torchvision costs
# about 2 s, so builders.py loads on the first access to one of them.
_BUILDERS = ("densenet121", "densenet161", "densenet169", "densenet201", "densenet264", "densenet_bc")

__all__ = [  # noqa: PLE0604 (_BUILDERS is a tuple of str)
    "DenseNet", *_BUILDERS,
    "convert", "convert_sync_batchnorm", "SyncBatchNorm2d", "reference", "peak_memory",
    "set_backend", "use_backend", "get_backend_name", "available_backends",
    "set_fallback", "get_fallback", "reset_fallback_warnings", "FallbackError",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _BUILDERS:
        from . import builders

        return getattr(builders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_BUILDERS))
