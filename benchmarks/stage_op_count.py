"""ATen ops one training step dispatches, by where they come from (the stage's bookkeeping or the backends).

    python benchmarks/stage_op_count.py [--backend cpp torch] [--model densenet121] [--size 32] [--batch 2]

Counts torch.profiler's leaf ``aten::`` events (no aten child) that are neither views nor allocations,
over one forward + backward after a warm-up step, float32 on CPU. A ``_foreach_*`` op counts once
(one launch on CUDA's fast path; on CPU it loops over its tensors in C++). Ops inside a backend's fused op
(``densenet_fast::*`` C++ ops) are not aten events of their own and are not counted; ops the torch
backend runs in Python are counted under "backend". Each op is put in a category by the Python
function that dispatched it (the innermost densenet_fast frame of its stack):

    running stats   the running-stats update          coefficient math  BN scale/shift/invstd, backward coefficients
    clones          .clone() of small outputs          casts             dtype conversions (aten::_to_copy)
    copies          other copy_ calls                  backend           the op interface's implementations
    model           stem, head, loss (outside the stages), and anything else

A TorchDispatchMode would count the wrong thing: while one is active the model runs its modules.
"""
from __future__ import annotations

import argparse
import collections
import re

import torch
from torch.profiler import ProfilerActivity, profile

import densenet_fast

# Views and allocations launch no kernel.
_FREE = {
    "aten::view", "aten::as_strided", "aten::slice", "aten::select", "aten::t", "aten::transpose",
    "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::reshape", "aten::_reshape_alias", "aten::alias",
    "aten::detach", "aten::permute", "aten::narrow", "aten::unbind", "aten::split", "aten::chunk", "aten::lift_fresh",
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided",
    "aten::resize_", "aten::_unsafe_view", "aten::unflatten", "aten::flatten", "aten::numpy_T", "aten::result_type",
    "aten::is_nonzero", "aten::_has_compatible_shallow_copy_type", "aten::set_", "aten::contiguous",
    "aten::view_as", "aten::expand_as", "aten::unfold", "aten::diagonal", "aten::_nested_tensor_from_mask_left_aligned",
}
# Dispatches that do no work when they find nothing to do (a cast to the same dtype, a conjugate bit).
_NO_OP = {"aten::to", "aten::resolve_conj", "aten::resolve_neg", "aten::contiguous"}
_FRAME = re.compile(r"densenet_fast/(?:ops/)?(\w+)\.py\(\d+\): (\S+)")
_STAGE_OPS = ("densenet_fast::dense_stage", "densenet_fast::dense_stage_backward")


def _ancestors(e) -> list[str]:
    names = []
    e = e.cpu_parent
    while e is not None:
        names.append(e.name)
        e = e.cpu_parent
    return names


def _called(name: str, stack: list[str]) -> str:
    """The aten op Python called (a leaf's outermost aten ancestor): aten::clone for its copy_."""
    for a in stack:
        if not a.startswith("aten::"):
            break
        name = a
    return name


def _where(stack: list[str]) -> str:
    """The innermost densenet_fast frame, 'file:function'."""
    for m in map(_FRAME.search, stack):
        if m:
            return ":".join(m.groups())
    return "?"


def _category(name: str, stack: list[str]) -> str:
    frames = [m.groups() for m in map(_FRAME.search, stack) if m]  # innermost first
    name = _called(name, stack)
    files = {f for f, _ in frames}
    if files & {"torch_backend", "cpp_backend", "composite_backend", "triton_backend"}:
        return "backend"
    func = frames[0][1] if frames else ""
    if not ({"stage", "stage_algorithm", "stage_sync"} & files):
        return "model"
    if func in ("_new_running_stats", "_update_running_stats", "update_running_stats", "_cumulative_factors"):
        return "running stats"
    if name == "aten::clone":
        return "clones"
    if name == "aten::_to_copy":
        return "casts"
    if name in ("aten::copy_", "aten::_foreach_copy_"):
        return "copies"
    if func in ("_normalize", "_batch_coefs", "_param_grads", "_rsqrt_eps", "_grad_factors", "_bn_param_grads") \
            or (func == "backward" and name in ("aten::mul", "aten::addcmul_", "aten::_foreach_mul",
                                                "aten::_foreach_addcmul_", "aten::stack")):
        return "coefficient math"
    return "other stage ops"


def leaf_ops(events) -> tuple[list, list]:
    """(leaf aten events that do work, leaf aten dispatches that found nothing to do), each as
    (name, ancestor names), outside the backends' fused ops."""
    work, no_op = [], []
    for e in events:
        if not e.name.startswith("aten::") or e.name in _FREE:
            continue
        ancestors = _ancestors(e)
        if any(a.startswith("aten::_foreach_") for a in ancestors):
            continue  # part of a _foreach op, counted once
        if not e.name.startswith("aten::_foreach_") and any(c.name.startswith("aten::") for c in e.cpu_children):
            continue
        if any(a.startswith(("densenet_fast::", "densenet_fast_triton::")) and a not in _STAGE_OPS for a in ancestors):
            continue  # inside a backend's fused op
        (no_op if e.name in _NO_OP else work).append((e.name, ancestors))
    return work, no_op


def count_step(model, x):
    """(work ops by category, by name, no-op dispatches by category) of one training step."""
    def step():
        out = model(x)
        out.sum().backward()

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        step()
    work, no_op = leaf_ops(prof.events())
    by_category = collections.Counter(_category(name, stack) for name, stack in work)
    by_name = collections.Counter(name for name, _ in work)
    no_op_by_category = collections.Counter(_category(name, stack) for name, stack in no_op)
    detail = collections.Counter((_category(name, stack), _where(stack), _called(name, stack)) for name, stack in work)
    return by_category, by_name, no_op_by_category, detail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", nargs="+", default=["cpp", "torch"])
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--names", type=int, default=12, help="most frequent op names to list")
    parser.add_argument("--detail", action="store_true", help="list (category, function, op) counts")
    parser.add_argument("--no-torchvision", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    for backend in args.backend:
        model = getattr(densenet_fast, args.model)()
        with densenet_fast.use_backend(backend):
            by_category, by_name, no_op, detail = count_step(model, x)
        print(f"{args.model} {args.size}x{args.size} batch {args.batch} float32, backend {backend}: "
              f"{sum(by_category.values())} aten ops per training step (+ {sum(no_op.values())} no-op dispatches)")
        for category, n in by_category.most_common():
            print(f"  {category:18s} {n:6d}" + (f"  (+ {no_op[category]} no-op)" if no_op[category] else ""))
        print("  most frequent: " + ", ".join(f"{k.removeprefix('aten::')} {v}"
                                             for k, v in by_name.most_common(args.names)))
        if args.detail:
            for (category, where, op), n in sorted(detail.items()):
                print(f"    {category:18s} {where:45s} {op:30s} {n:5d}")
    if args.no_torchvision:
        return
    import torchvision

    by_category, by_name, *_ = count_step(torchvision.models.densenet121() if args.model == "densenet121"
                                             else getattr(torchvision.models, args.model)(), x)
    print(f"torchvision {args.model}: {sum(by_category.values())} aten ops per training step; most frequent: "
          + ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in by_name.most_common(args.names)))


if __name__ == "__main__":
    main()
