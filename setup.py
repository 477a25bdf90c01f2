"""Build script: the package, plus the compiled ops ``densenet_fast._C`` from ``csrc/``.

The C++ CPU kernels are built when a C++ compiler works; the CUDA kernels (``csrc/*.cu``) too when
nvcc and a CUDA build of torch are present. If the compiled build fails, the package still installs,
without ``_C`` (the pure-PyTorch backends run everything), after a warning. Environment switches
(the README's "Install" section):

    DENSENET_FAST_BUILD_EXT=0|1   0: build no extension; 1: the extension is required (a failed
                                  build fails the install); unset: build it if possible
    DENSENET_FAST_CUDA=0|1        0: CPU kernels only; 1: the CUDA kernels are required;
                                  unset: build them when nvcc and a CUDA torch are present
    DENSENET_FAST_ALLOW_TORCH_MISMATCH=1
                                  build in an isolated environment even though its torch differs
                                  from the installing environment's (the extension is then refused
                                  at load there)
    TORCH_CUDA_ARCH_LIST          GPU targets (default "8.0;9.0+PTX": sm_80, sm_90 and PTX)
    MAX_JOBS                      parallel compile jobs (default 2)
    CC, CXX, CUDA_HOME            the compilers and CUDA toolkit (torch.utils.cpp_extension's rules)

Install with ``pip install --no-build-isolation .`` so the extension is built against the torch
that will run it. The extension records that torch (densenet_fast/_extension.py) and is refused
at load by any other.
"""
import glob
import importlib.util
import json
import os
import subprocess
import sys
import traceback

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"


def _switch(name):
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 0 or 1, got {os.environ[name]!r}")


def _load_extension_module():
    # densenet_fast/_extension.py by path: the build record's format is defined once, there.
    spec = importlib.util.spec_from_file_location("_densenet_fast_extension",
                                                  os.path.join(ROOT, "densenet_fast", "_extension.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _installing_environment_torch():
    """The torch of the environment being installed into, as {"torch", "cuda", "origin"}, or None
    when it has none (or can't be asked). Read from its torch/version.py, without importing it.

    pip runs an isolated build with the installing environment's interpreter, hiding its
    site-packages behind PYTHONPATH and PYTHONNOUSERSITE; without them the interpreter sees the
    environment the package is installed into.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    probe = ("import importlib.util as u, json, os, runpy\n"
             "s = u.find_spec('torch')\n"
             "v = runpy.run_path(os.path.join(os.path.dirname(s.origin), 'version.py')) if s else None\n"
             "print(json.dumps(v and {'torch': v['__version__'], 'cuda': v['cuda'], 'origin': s.origin}))")
    try:
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                             timeout=120, check=True).stdout
        return json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def _check_build_torch(torch, record, cuda_kernels):
    """Fail early (before compiling) when this build's torch is not the one the package will run
    with: an isolated build, with its own freshly downloaded torch. `record`: _extension.py."""
    if _switch("DENSENET_FAST_ALLOW_TORCH_MISMATCH"):
        return
    target = _installing_environment_torch()
    if target is None or os.path.realpath(target["origin"]) == os.path.realpath(torch.__file__):
        return  # the same torch (a --no-build-isolation build), or none to compare with
    built = record.torch_record(cuda_kernels)
    reason = record.mismatch(built, dict(target, cxx11_abi=built["cxx11_abi"]))
    if reason is not None:
        sys.exit(
            "densenet_fast: this is an isolated build, compiling against its own torch instead of the "
            f"installing environment's, and the extension would be {reason} (refused at load). "
            "Build against the installed torch:\n"
            "    pip install --no-build-isolation <densenet_fast clone or sdist>\n"
            "(set DENSENET_FAST_ALLOW_TORCH_MISMATCH=1 to build anyway)")


def _extensions():
    if _switch("DENSENET_FAST_BUILD_EXT") is False:
        return [], {}
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists("/usr/local/cuda/bin/nvcc"):
        # The standard toolkit location; torch would otherwise guess from `which nvcc`, wrong
        # when nvcc on PATH is a wrapper script outside the toolkit.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    record = _load_extension_module()
    os.environ.setdefault("MAX_JOBS", "2")
    want_cuda = _switch("DENSENET_FAST_CUDA")
    # torch guesses CUDA_HOME=/usr/local/cuda when that folder exists, nvcc or not.
    has_nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    can_cuda = torch.version.cuda is not None and has_nvcc
    if want_cuda and not can_cuda:
        raise RuntimeError(
            "DENSENET_FAST_CUDA=1 but the CUDA kernels can't be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r} (is nvcc installed?)"
        )
    with_cuda = can_cuda if want_cuda is None else want_cuda
    _check_build_torch(torch, record, with_cuda)
    required = _switch("DENSENET_FAST_BUILD_EXT") is True or want_cuda is True

    class BuildWithRecord(BuildExtension):
        """Compiles the build record into the library; without a working compiler, builds none
        (unless the extension is required)."""

        def build_extensions(self):
            os.makedirs(self.build_temp, exist_ok=True)
            for ext in self.extensions:
                source = os.path.join(self.build_temp, "build_record.cpp")
                cuda_kernels = any(s.endswith(".cu") for s in ext.sources)
                with open(source, "w") as f:
                    f.write(record.record_source(record.torch_record(cuda_kernels)))
                if source not in ext.sources:
                    ext.sources.append(source)
            try:
                super().build_extensions()
            except Exception:
                if required:
                    raise
                detail = traceback.format_exc(limit=1).strip().splitlines()[-1]
                self.warn(
                    "\n" + "=" * 78 + "\ndensenet_fast: the compiled extension densenet_fast._C could not be "
                    f"built ({detail}).\nInstalling the pure-PyTorch package: the 'torch' (and on CUDA "
                    "'triton') backends run everything, the 'cpp' backend is unavailable.\nSet "
                    "DENSENET_FAST_BUILD_EXT=1 to make this an error, =0 to skip the build.\n" + "=" * 78)
                self.extensions = []

    # -fopenmp: at::parallel_for is inline OpenMP code, serial without it (and `omp simd` lets
    # the reductions vectorize). -fno-trapping-math (as torch itself builds): without it GCC
    # keeps the ReLU mask's compare as a branch and the BN-ReLU backward loops scalar.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    cmdclass = {"build_ext": BuildWithRecord.with_options(use_ninja=True)}
    if not with_cuda:
        ext = CppExtension("densenet_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
        return [ext], cmdclass

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    sources += sorted(glob.glob(os.path.join(CSRC, "*.cu")))
    ext = CUDAExtension(
        "densenet_fast._C",
        sources,
        define_macros=[("DENSENET_FAST_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        extra_link_args=["-fopenmp"],
    )
    return [ext], cmdclass


if __name__ == "__main__":  # also under pip and python -m build (setuptools runs this file as __main__)
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
