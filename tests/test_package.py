"""Packaging: what `import densenet_fast` costs, the compiled extension's build record and its
refusal under another torch, and an install without a C++ compiler.

The full route (sdist -> wheel -> fresh venv -> smoke test, and a _C built under torch 2.14.1
loaded under torch 2.13.0) takes minutes of compiling and installing: it runs in .ci/run.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

import densenet_fast
from densenet_fast import _extension
from densenet_fast.ops import registry as ops

ROOT = Path(__file__).resolve().parents[1]
BUILT = os.environ.get("DENSENET_FAST_BUILD_EXT", "").strip() != "0"


def _env(**changes):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(changes)
    return env


# ---- import cost ---------------------------------------------------------------------------------


def _imported(statement: str) -> dict[str, int]:
    """Module -> self import time (us) of `python -X importtime -c statement`, in a fresh process."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", statement], env=_env(),
                            capture_output=True, text=True, check=True, cwd=ROOT)
    times = {}
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if match:
            times[match.group(2)] = int(match.group(1))
    return times


@pytest.mark.slow
def test_import_adds_only_its_own_modules_to_torchs():
    """`import densenet_fast` imports nothing beyond torch but its own modules and the standard
    library (torch._dynamo, triton, torchvision, sympy, matplotlib, ... stay unimported), and those
    cost under 0.3 s. Measured as -X importtime's self times of just the extra modules, each the
    minimum over 3 fresh processes (the first may also write stale bytecode): on a loaded machine
    one wall-clock measurement of two processes varies by more than the budget."""
    torch_alone = _imported("import torch")
    runs = [_imported("import densenet_fast") for _ in range(3)]
    extra = {name: min(run.get(name, 0) for run in runs) for name in runs[0] if name not in torch_alone}
    foreign = sorted(name for name in extra if name.split(".")[0] not in sys.stdlib_module_names
                     and name.split(".")[0] != "densenet_fast")
    assert not foreign, f"import densenet_fast also imports {foreign}"
    assert "densenet_fast" in extra
    assert sum(extra.values()) < 300_000, f"modules beyond torch's took {sum(extra.values()) / 1e6:.2f} s: {extra}"


def test_backend_name_is_marked_constant_as_assume_constant_result_marks():
    # ops/registry.py sets the decorator's attribute itself (the decorator imports torch._dynamo);
    # if torch ever marks functions differently, this fails (test_compile would recompile).
    import torch._dynamo

    def probe():
        pass

    torch._dynamo.assume_constant_result(probe)
    assert vars(probe), "assume_constant_result no longer marks the function with an attribute"
    for name, value in vars(probe).items():
        assert getattr(ops.backend_name_for, name, None) == value, name


# ---- the build record ----------------------------------------------------------------------------


def _fake_library(path: Path, record: dict | None) -> str:
    """A file laid out as far as read_record cares: bytes, the record, a NUL, more bytes."""
    body = b"" if record is None else _extension.MARKER + json.dumps(record).encode() + b"\0"
    path.write_bytes(b"\x7fELF" + bytes(range(256)) * 16 + body + b"\x00tail")
    return str(path)


@pytest.mark.skipif(not BUILT, reason="installed with DENSENET_FAST_BUILD_EXT=0: no compiled extension")
def test_built_extension_records_the_torch_it_runs_with():
    from densenet_fast.ops.extension_ops import built_with_cuda

    origin = importlib.util.find_spec("densenet_fast._C").origin
    assert _extension.read_record(origin) == _extension.torch_record(cuda_kernels=built_with_cuda())
    # Both backends on the extension: the fused CPU ops and the per-channel kernels around ATen's convolutions.
    assert {"cpp", "composite"} <= set(densenet_fast.available_backends())


RUNNING = {"torch": "2.14.1+cu130", "cuda": "13.0", "cxx11_abi": True, "cuda_kernels": False}


@pytest.mark.parametrize("built, reason", [
    (dict(RUNNING), None),
    (dict(RUNNING, torch="2.14.1+cpu", cuda=None), None),  # CPU kernels: any CUDA variant of 2.14.1
    (dict(RUNNING, torch="2.14.0+cu130"), "built for torch 2.14.0+cu130, running 2.14.1+cu130"),
    (dict(RUNNING, torch="2.13.0+cpu", cuda=None), "built for torch 2.13.0+cpu, running 2.14.1+cu130"),
    (dict(RUNNING, cuda="12.8", cuda_kernels=True),
     "built for torch 2.14.1+cu130 with CUDA 12.8, running 2.14.1+cu130 with CUDA 13.0"),
    (dict(RUNNING, cxx11_abi=False),
     "built for torch 2.14.1+cu130 (pre-C++11 ABI), running 2.14.1+cu130 (C++11 ABI)"),
])
def test_mismatch_names_both_torches(built, reason):
    assert _extension.mismatch(built, RUNNING) == reason


def test_cuda_built_library_under_cpu_torch_is_built_for_another_torch():
    built = dict(RUNNING, cuda_kernels=True)
    cpu_torch = dict(RUNNING, torch="2.14.1+cpu", cuda=None)
    assert _extension.mismatch(built, cpu_torch) == (
        "built for torch 2.14.1+cu130 with CUDA 13.0, running 2.14.1+cpu without CUDA")


def test_library_for_another_torch_is_refused_with_one_one_line_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(_extension, "_warned", False)
    fake = _fake_library(tmp_path / "_C.so", dict(_extension.torch_record(), torch="2.13.0+cpu", cuda=None))
    with pytest.warns(_extension.ExtensionMismatchWarning) as caught:
        for _ in range(2):  # the registry may try again: still one warning
            with pytest.raises(ImportError,
                               match=rf"built for torch 2\.13\.0\+cpu, running {re.escape(torch.__version__)}"):
                _extension.load_extension(fake)
    assert len(caught) == 1
    w = caught[0]
    shown = warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line)
    assert shown.count("\n") == 1 and fake in shown and "rebuild" in shown, shown


def test_library_without_record_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(_extension, "_warned", False)
    with pytest.warns(_extension.ExtensionMismatchWarning, match="no build record"):
        with pytest.raises(ImportError, match="no build record"):
            _extension.load_extension(_fake_library(tmp_path / "_C.so", None))


@pytest.mark.skipif(not BUILT, reason="installed with DENSENET_FAST_BUILD_EXT=0: no compiled extension")
def test_registry_reports_cpp_built_for_another_torch(monkeypatch):
    # The real library file, read as if its record named torch 2.13.0: neither backend on it may load it.
    real = _extension.read_record
    monkeypatch.setattr(_extension, "read_record", lambda path: dict(real(path), torch="2.13.0"))
    monkeypatch.setattr(_extension, "_warned", False)
    monkeypatch.setattr(ops, "_instances", {})
    monkeypatch.setattr(ops, "_unavailable", {})
    for module in ("cpp_backend", "composite_backend", "extension_ops"):  # (extension_ops loads the library)
        monkeypatch.delitem(sys.modules, f"densenet_fast.ops.{module}", raising=False)
    with pytest.warns(_extension.ExtensionMismatchWarning) as caught:
        available = densenet_fast.available_backends()
    assert len(caught) == 1  # one warning for both backends
    assert "cpp" not in available and "composite" not in available and "torch" in available
    running = re.escape(torch.__version__.split("+")[0])
    for name in ("cpp", "composite"):
        assert re.search(rf"built for torch 2\.13\.0\S*, running {running}", ops._unavailable[name]), \
            ops._unavailable
        with pytest.raises(RuntimeError, match="built for torch 2.13.0"):
            densenet_fast.set_backend(name)


# ---- building ------------------------------------------------------------------------------------


def _setup_module():
    spec = importlib.util.spec_from_file_location("densenet_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the functions, builds nothing
    return module


def test_setup_sees_the_installing_environments_torch_through_pips_isolation(monkeypatch):
    setup = _setup_module()
    # pip's isolated build: PYTHONPATH and PYTHONNOUSERSITE hide the installing environment.
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "nonexistent-build-env"))
    monkeypatch.setenv("PYTHONNOUSERSITE", "1")
    target = setup._installing_environment_torch()
    assert (target["torch"], target["cuda"]) == (torch.__version__, torch.version.cuda)
    assert os.path.realpath(target["origin"]) == os.path.realpath(torch.__file__)


@pytest.mark.parametrize("target, cuda_kernels, stops", [
    ({"torch": "2.13.0+cpu", "cuda": None}, False, r"built for torch 2\.14\.1\+cu130, running 2\.13\.0\+cpu"),
    ({"torch": "2.14.1+cpu", "cuda": None}, True, r"with CUDA 13\.0, running 2\.14\.1\+cpu without CUDA"),
    ({"torch": "2.14.1+cpu", "cuda": None}, False, None),  # CPU kernels only: loads under 2.14.1+cpu
    ({"torch": "2.14.1", "cuda": "13.0"}, True, None),
])
def test_isolated_build_with_another_torch_stops_early(monkeypatch, target, cuda_kernels, stops):
    setup = _setup_module()
    record = setup._load_extension_module()
    isolated = {"torch": "2.14.1+cu130", "cuda": "13.0", "cxx11_abi": True}
    monkeypatch.setattr(record, "torch_record", lambda kernels: dict(isolated, cuda_kernels=kernels))
    isolated_torch = type("IsolatedTorch", (), {"__file__": "/tmp/pip-build-env-x/overlay/torch/__init__.py"})
    monkeypatch.setattr(setup, "_installing_environment_torch",
                        lambda: dict(target, origin="/venv/lib/python3.11/site-packages/torch/__init__.py"))
    monkeypatch.delenv("DENSENET_FAST_ALLOW_TORCH_MISMATCH", raising=False)
    if stops is None:
        setup._check_build_torch(isolated_torch, record, cuda_kernels)
        return
    with pytest.raises(SystemExit, match=rf"(?s)isolated build.*{stops}.*--no-build-isolation"):
        setup._check_build_torch(isolated_torch, record, cuda_kernels)
    monkeypatch.setenv("DENSENET_FAST_ALLOW_TORCH_MISMATCH", "1")
    setup._check_build_torch(isolated_torch, record, cuda_kernels)  # the escape hatch


def _copy_source(dest: Path) -> Path:
    dest.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info")
    for name in ("csrc", "densenet_fast"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    return dest


@pytest.mark.slow
def test_without_a_compiler_the_package_installs_pure_pytorch(tmp_path):
    src = _copy_source(tmp_path / "src")
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", "-w", str(wheels), str(src)],
        env=_env(CC="false", CXX="false", DENSENET_FAST_BUILD_EXT="", DENSENET_FAST_CUDA=""),
        capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "densenet_fast._C could not be built" in build.stdout + build.stderr
    (wheel,) = wheels.glob("densenet_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "densenet_fast/ops/cpp_backend.py" in names and not [n for n in names if n.endswith(".so")], names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import densenet_fast, torch; from densenet_fast.ops import registry as ops; "
             "print(densenet_fast.__file__); print(densenet_fast.available_backends()); "
             "print(ops._unavailable['cpp']); print(ops._unavailable['composite'])")
    # -S: no .pth files, so an editable install of densenet_fast in this venv can't supply its _C.
    path = os.pathsep.join([str(site), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    run = subprocess.run([sys.executable, "-S", "-c", probe], env=_env(PYTHONPATH=path), capture_output=True,
                         text=True, cwd=tmp_path, check=True)
    where, backends, reason, composite_reason = run.stdout.splitlines()
    assert where.startswith(str(site)), where
    # triton serves CUDA tensors only (or CPU ones under TRITON_INTERPRET=1, unset here).
    expected = ["torch", "triton"] if torch.cuda.is_available() and importlib.util.find_spec("triton") else ["torch"]
    assert backends == str(expected) and "not built in this installation" in reason, run.stdout
    assert "not built in this installation" in composite_reason, run.stdout
