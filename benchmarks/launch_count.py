"""Kernel launches per training step: densenet_fast's triton backend against torchvision, on CPU.

    python benchmarks/launch_count.py                  # DenseNet-121 (32x32, batch 2), DenseNet-BC-100 (k=12)
    python benchmarks/launch_count.py --top 15         # more of our most frequent ops
    python benchmarks/launch_count.py --run-kernels    # run the interpreted Triton kernels too (slow)

A GPU step's host cost is mostly one dispatch per kernel, so the count of launches is what a CUDA
step pays for before any kernel runs; it is counted here on CPU, where the triton backend runs in
Triton's interpreter (TRITON_INTERPRET=1, set by this script before triton is imported).

Counting rule. One training step (forward of a batch, ``out.float().sum().backward()``; no optimizer
step, gradients dropped before it) is profiled with ``torch.profiler`` (CPU activity). Counted:

* every Triton kernel launch (``kernel[grid](...)``), once, whatever its grid;
* every *leaf* op of ATen or of densenet_fast's C++ extension: an op none of whose nested ops is
  counted (``aten::zeros`` is counted as its ``fill_``; ``conv2d`` as its ``mkldnn_convolution``),
  except views (ops whose every overload returns an alias of an input without writing it: ``view``,
  ``slice``, ``as_strided``, ``t``, ``detach``, a ``to`` or ``contiguous`` that changes nothing, ...),
  metadata changes (``as_strided_``, ``resize_``, ``set_``, ...), allocations (``empty*``) and
  ``_local_scalar_dense`` (``.item()``: a host sync, reported on its own);
* a ``_foreach_*`` op as one kernel per 30 tensors, where the CPU runs it as one op per tensor: an
  upper bound of what CUDA's fast path launches (multi_tensor_apply takes 110 tensors for one list
  down to 30 for five under CUDA 12; CUDA 13 builds take 210 to 770). An op that CUDA runs on its
  slow path (mismatched shapes or dtypes: the 0-dim factors of momentum=None) launches per tensor
  and is undercounted;
* nothing that runs inside a Triton launch (the interpreter's own copies to and from the host).

On CUDA a counted op is one kernel, or a few (cuDNN convolutions, cuBLAS GEMMs); on CPU some ops
decompose differently, so the numbers are estimates of the same order as a CUDA trace's, and the
ratios between models are what to read. ``count_step_launches`` is importable.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Optional

os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton backend on CPU tensors

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_TRITON_PREFIX = "triton::"
_COUNTED_NAMESPACES = ("aten::", "densenet_fast::")
_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift", "lift_fresh",
                "lift_fresh_copy", "record_stream"}
# In-place changes of a tensor's metadata (sizes, strides, storage), not of its values.
_METADATA = {"as_strided_", "resize_", "resize_as_", "set_", "detach_", "squeeze_", "unsqueeze_", "t_",
             "transpose_", "swapdims_", "_unsafe_view"}
_HOST_SYNCS = {"_local_scalar_dense"}
_FOREACH_PREFIX = "aten::_foreach_"
_FOREACH_TENSORS_PER_LAUNCH = 30


@dataclass
class LaunchCount:
    """Launches of one training step: counted ops by name, Triton launches by kernel, host syncs."""

    ops: Counter = field(default_factory=Counter)
    triton: Counter = field(default_factory=Counter)
    host_syncs: int = 0

    @property
    def total(self) -> int:
        return sum(self.ops.values()) + sum(self.triton.values())


@cache
def _is_view(qualified: str) -> bool:
    """Whether every tensor that any overload of op ``ns::name`` returns is an alias of an input
    that the op does not write (a view, or the input itself)."""
    namespace, name = qualified.split("::", 1)
    packet = getattr(getattr(torch.ops, namespace, None), name, None)
    if packet is None:
        return False
    returns = [r for overload in packet.overloads() for r in getattr(packet, overload)._schema.returns
               if isinstance(r.type, torch.TensorType)
               or (isinstance(r.type, torch.ListType) and isinstance(r.type.getElementType(), torch.TensorType))]
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _excluded(name: str) -> bool:
    short = name.split("::", 1)[1]
    return short in _ALLOCATIONS or short in _METADATA or _is_view(name)


def _count_events(events) -> LaunchCount:
    count = LaunchCount()

    def visit(event, in_launch: bool) -> bool:
        """Counts ``event``'s subtree; returns whether anything in it was counted."""
        name = event.name
        if name.startswith(_TRITON_PREFIX):
            if not in_launch:
                count.triton[name[len(_TRITON_PREFIX):]] += 1
            for child in event.cpu_children:
                visit(child, True)
            return True
        if name.startswith(_FOREACH_PREFIX) and not in_launch:
            outer, count.ops = count.ops, Counter()
            for child in event.cpu_children:
                visit(child, in_launch)
            per_tensor, count.ops = sum(count.ops.values()), outer
            count.ops[name] += max(1, -(-per_tensor // _FOREACH_TENSORS_PER_LAUNCH))
            return True
        counted_below = False
        for child in event.cpu_children:
            counted_below |= visit(child, in_launch)
        if in_launch or counted_below or not name.startswith(_COUNTED_NAMESPACES):
            return counted_below
        if name.split("::", 1)[1] in _HOST_SYNCS:
            count.host_syncs += 1
            return False
        if _excluded(name):
            return False
        count.ops[name] += 1
        return True

    for event in events:
        if event.cpu_parent is None:
            visit(event, False)
    return count


class _TritonLaunchMarkers:
    """While active, every interpreted Triton launch is a ``triton::<kernel>`` profiler range; with
    ``run_kernels=False`` the kernel is not run (its outputs keep whatever their memory held)."""

    def __init__(self, run_kernels: bool) -> None:
        self.run_kernels = run_kernels

    def __enter__(self):
        from triton.runtime.interpreter import GridExecutor

        self._cls, self._call = GridExecutor, GridExecutor.__call__
        original, run_kernels = self._call, self.run_kernels

        def marked(executor, *args, **kwargs):
            with torch.profiler.record_function(_TRITON_PREFIX + executor.fn.__name__):
                return original(executor, *args, **kwargs) if run_kernels else None

        GridExecutor.__call__ = marked
        return self

    def __exit__(self, *exc):
        self._cls.__call__ = self._call


def _require_interpreter() -> None:
    from densenet_fast.ops import triton_backend

    if not triton_backend._INTERPRETED:
        raise RuntimeError("launch counting runs the triton backend in Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before triton (or densenet_fast's triton backend) is first imported")


def count_step_launches(model: nn.Module, x: torch.Tensor, backend: Optional[str] = None, warmup: bool = True,
                        run_kernels: bool = False) -> LaunchCount:
    """Launches of one training step of ``model`` on ``x`` (CPU tensors), by the rule above;
    ``backend`` pins a densenet_fast backend ("triton" needs the interpreter).

    The interpreter runs a Triton program in about 0.1-1 s, so by default the Triton kernels are
    counted, not run: a step's sequence of ops does not depend on the values it computes (it has
    no host syncs; ``host_syncs`` says if it does), and ``run_kernels=True`` (``--run-kernels``)
    gives the same counts, in minutes per step."""
    import densenet_fast

    if backend == "triton":
        _require_interpreter()
    with densenet_fast.use_backend(backend):
        def step():
            for p in model.parameters():
                p.grad = None
            model(x).float().sum().backward()

        model.train()
        with _TritonLaunchMarkers(run_kernels):
            if warmup:  # one-time work (caches, lazy initialization) is not per-step
                step()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                step()
    return _count_events(prof.events())


def workloads() -> list[tuple[str, Callable[[bool], nn.Module], Callable[[], nn.Module], tuple[int, ...]]]:
    """(name, torchvision builder taking memory_efficient, densenet_fast builder, input shape)."""
    import torchvision

    import densenet_fast
    from densenet_fast.comparison import torchvision_densenet_bc

    return [
        ("DenseNet-121, 32x32, batch 2", lambda me: torchvision.models.densenet121(memory_efficient=me),
         densenet_fast.densenet121, (2, 3, 32, 32)),
        ("DenseNet-BC-100 (k=12), 32x32, batch 2", lambda me: torchvision_densenet_bc(100, 12, memory_efficient=me),
         lambda: densenet_fast.densenet_bc(depth=100, growth_rate=12), (2, 3, 32, 32)),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=10, help="how many of our most frequent ops to list")
    parser.add_argument("--run-kernels", action="store_true",
                        help="run the Triton kernels in the interpreter instead of only counting them (slow)")
    args = parser.parse_args(argv)
    _require_interpreter()
    torch.manual_seed(0)
    rows, ours = [], {}
    for name, make_tv, make_fast, shape in workloads():
        x = torch.randn(shape)
        fast = count_step_launches(make_fast(), x, backend="triton", run_kernels=args.run_kernels)
        tv = count_step_launches(make_tv(False), x)
        tv_me = count_step_launches(make_tv(True), x)
        ours[name] = fast
        rows.append(f"| {name} | {sum(fast.ops.values())} + {sum(fast.triton.values())} = {fast.total} | "
                    f"{fast.host_syncs} | {tv.total} | {tv_me.total} | {fast.total / tv.total:.2f}x | "
                    f"{fast.total / tv_me.total:.2f}x |")
    print(f"Kernel launches per training step (CPU profile, torch {torch.__version__}; rule: see --help)\n")
    print("| workload | densenet_fast[triton]: ops + Triton = total | host syncs | torchvision | "
          "tv memory_efficient | ours / tv | ours / tv mem-eff |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    for name, count in ours.items():
        top = ", ".join(f"{op.split('::', 1)[1]} {n}" for op, n in count.ops.most_common(args.top))
        kernels = ", ".join(f"{k} {n}" for k, n in count.triton.most_common(args.top))
        print(f"\n{name}, ours: ops {top}\n  Triton: {kernels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
