"""What a compiled Triton kernel's hot loop does on the GPU, read from its SASS (``cuobjdump -sass``
of the cubin, with the cuobjdump Triton ships).

A hot loop is an innermost loop (a backward branch's range) holding matrix instructions: HGMMA
(Hopper's warpgroup MMA, wgmma) or HMMA (mma.sync); the whole kernel when no loop holds them (a
loop that one specialization runs once is unrolled); for float32 dots on FMAs, the loop with the
most FFMAs. A kernel that runs two jobs in one launch (the backward's data and weight GEMMs) has a
hot loop per job, and each fact is the worst over them:

* ``mma``: "wgmma", "mma.sync" or "fma";
* ``async``: "tma" (UTMALDG), "cp.async" (LDGSTS) or "-" (global loads go through registers);
* ``wait``: the largest count of the loop's wgmma waits (``WARPGROUP.DEPBAR.LE gsb0, N``, PTX's
  ``wgmma.wait_group N``): 0 means each wgmma has finished before the loop goes on (nothing
  overlaps), >= 1 that the software pipeline keeps one in flight while the next tiles load;
* ``narrow``: global loads in the loop narrower than 32 bits (2-byte scalars: a tile that could
  not be vectorized, because its addresses or mask were not known to be aligned/contiguous);
* spills come from ptxas (see triton_aot.py) and are cross-checked with local loads/stores (LDL/STL).
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")
_WGMMA_WAIT = re.compile(r"gsb0,\s*0x([0-9a-f]+)")


@dataclass(frozen=True)
class SassFacts:
    mma: str  # "wgmma", "mma.sync", "fma" (or "none": no loop with matrix work)
    async_copy: str  # "tma", "cp.async" or "-"
    wgmma_wait: int  # largest wgmma wait count in the hot loop (-1: no wgmma wait there)
    narrow_loads: int  # global loads narrower than 32 bits in the hot loop
    local_memory: int  # LDL/STL instructions in the whole kernel (register spills)

    def describe(self) -> str:
        wait = f", wait {self.wgmma_wait}" if self.wgmma_wait >= 0 else ""
        return (f"{self.mma}{wait}, async {self.async_copy}, {self.narrow_loads} narrow loads, "
                f"{self.local_memory} local ld/st")


def disassemble(cubin: bytes) -> str:
    """The SASS of a cubin, by Triton's bundled cuobjdump."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout


def _instructions(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) per instruction."""
    return [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _LINE.finditer(sass)]


def _loops(code: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """(first, last) instruction indices of every loop: a branch back to an earlier address."""
    index = {addr: i for i, (addr, _, _) in enumerate(code)}
    loops = []
    for i, (addr, op, operands) in enumerate(code):
        if op.startswith("BRA"):
            target = _BRANCH_TARGET.search(operands)
            if target and int(target.group(1), 16) < addr and int(target.group(1), 16) in index:
                loops.append((index[int(target.group(1), 16)], i))
    return loops


def _count(code, prefixes: tuple[str, ...]) -> int:
    return sum(1 for _, op, _ in code if op.startswith(prefixes))


def _is_narrow_global_load(op: str) -> bool:
    return op.startswith("LDG") and any(f".{w}" in op for w in ("U8", "S8", "U16", "S16"))


_ASYNC_RANK = ("-", "cp.async", "tma")  # worst first


def _async_copy(body) -> str:
    if _count(body, ("UTMALDG", "UBLKCP")):
        return "tma"
    return "cp.async" if _count(body, ("LDGSTS",)) else "-"


def _wgmma_wait(body) -> int:
    waits = [int(w.group(1), 16) for _, op, operands in body if op.startswith("WARPGROUP.DEPBAR")
             for w in [_WGMMA_WAIT.search(operands)] if w]
    return max(waits) if waits else -1


def _contains(outer: tuple[int, int], inner: tuple[int, int]) -> bool:
    return outer != inner and outer[0] <= inner[0] and inner[1] <= outer[1]


def facts(sass: str) -> SassFacts:
    code = _instructions(sass)
    loops = _loops(code)
    matrix = [r for r in loops if _count(code[r[0]:r[1] + 1], ("HGMMA", "HMMA"))]
    hot = [r for r in matrix if not any(_contains(r, other) for other in matrix)]  # innermost ones
    if not hot and _count(code, ("HGMMA", "HMMA")):
        hot = [(0, len(code) - 1)]  # straight-line code: the loops were unrolled
    if hot:
        kinds = ["wgmma" if _count(code[a:b + 1], ("HGMMA",)) else "mma.sync" for a, b in hot]
        mma = "mma.sync" if "mma.sync" in kinds else "wgmma"
    else:
        with_ffma = [(a, b) for a, b in loops if _count(code[a:b + 1], ("FFMA",))]
        hot = [max(with_ffma, key=lambda r: _count(code[r[0]:r[1] + 1], ("FFMA",)), default=(0, len(code) - 1))]
        mma = "fma" if with_ffma else "none"
    bodies = [code[a:b + 1] for a, b in hot]
    waits = [_wgmma_wait(body) for body in bodies]
    return SassFacts(mma=mma, async_copy=min((_async_copy(body) for body in bodies), key=_ASYNC_RANK.index),
                     wgmma_wait=min(waits) if mma == "wgmma" else max(waits),
                     narrow_loads=max(sum(1 for _, op, _ in body if _is_narrow_global_load(op)) for body in bodies),
                     local_memory=_count(code, ("LDL", "STL")))


def kernel_facts(kernel) -> SassFacts:
    """Facts of a Triton CompiledKernel (its ``asm`` holds the cubin and the PTX)."""
    return facts(disassemble(kernel.asm["cubin"]))
