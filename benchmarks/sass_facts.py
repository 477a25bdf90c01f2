"""What a compiled Triton kernel's hot loop does on the GPU, read from its SASS (``cuobjdump -sass``
of the cubin, with the cuobjdump Triton ships).

The hot loop is the innermost loop (a backward branch's range) holding the kernel's matrix
instructions: HGMMA (Hopper's warpgroup MMA, wgmma), else HMMA (mma.sync), else, for float32 dots
on FMAs, the loop with the most FFMAs (the whole kernel when no loop holds them: a loop that one
specialization runs once is unrolled). Within it we report:

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


def facts(sass: str) -> SassFacts:
    code = _instructions(sass)
    loops = sorted(_loops(code), key=lambda r: r[1] - r[0])  # innermost (shortest) first
    # A loop that runs once for a specialization (a pixel split of one tile) is straight-line code:
    # then the whole kernel is its "hot loop".
    spans = loops + [(0, len(code) - 1)]
    for kind, prefixes in (("wgmma", ("HGMMA",)), ("mma.sync", ("HMMA",))):
        hot = next(((a, b) for a, b in spans if _count(code[a:b + 1], prefixes)), None)
        if hot is not None:
            mma = kind
            break
    else:
        with_ffma = [(a, b) for a, b in loops if _count(code[a:b + 1], ("FFMA",))]
        hot = max(with_ffma, key=lambda r: _count(code[r[0]:r[1] + 1], ("FFMA",)), default=(0, len(code) - 1))
        mma = "fma" if with_ffma else "none"
    body = code[hot[0]:hot[1] + 1]
    if _count(body, ("UTMALDG", "UBLKCP")):
        async_copy = "tma"
    elif _count(body, ("LDGSTS",)):
        async_copy = "cp.async"
    else:
        async_copy = "-"
    waits = [int(w.group(1), 16) for _, op, operands in body if op.startswith("WARPGROUP.DEPBAR")
             for w in [_WGMMA_WAIT.search(operands)] if w]
    return SassFacts(mma=mma, async_copy=async_copy, wgmma_wait=max(waits) if waits else -1,
                     narrow_loads=sum(1 for _, op, _ in body if _is_narrow_global_load(op)),
                     local_memory=_count(code, ("LDL", "STL")))


def kernel_facts(kernel) -> SassFacts:
    """Facts of a Triton CompiledKernel (its ``asm`` holds the cubin and the PTX)."""
    return facts(disassemble(kernel.asm["cubin"]))
