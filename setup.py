"""Build script: the package, plus the compiled ops ``densenet_fast._C`` from ``csrc/``.

The C++ CPU kernels are always built; the CUDA kernels (``csrc/*.cu``) are built when nvcc and a
CUDA build of torch are present. Environment switches:

    DENSENET_FAST_CUDA=0|1        skip / require the CUDA kernels (default: build them if possible)
    DENSENET_FAST_BUILD_EXT=0     build no extension at all (the pure-PyTorch backends still work)
    TORCH_CUDA_ARCH_LIST          GPU targets (default "8.0;9.0+PTX": sm_80, sm_90 and PTX)
    MAX_JOBS                      parallel compile jobs (default 2)

Install with ``pip install --no-build-isolation -e .`` so the build uses the installed torch.
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _switch(name):
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 0 or 1, got {os.environ[name]!r}")


def _extensions():
    if _switch("DENSENET_FAST_BUILD_EXT") is False:
        return [], {}
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists("/usr/local/cuda/bin/nvcc"):
        # The standard toolkit location; torch would otherwise guess from `which nvcc`, wrong
        # when nvcc on PATH is a wrapper script outside the toolkit.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", "2")
    want_cuda = _switch("DENSENET_FAST_CUDA")
    can_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if want_cuda and not can_cuda:
        raise RuntimeError(
            "DENSENET_FAST_CUDA=1 but the CUDA kernels can't be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r} (is nvcc installed?)"
        )
    with_cuda = can_cuda if want_cuda is None else want_cuda

    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    # -fopenmp: at::parallel_for is inline OpenMP code, serial without it (and `omp simd` lets
    # the reductions vectorize). -fno-trapping-math (as torch itself builds): without it GCC
    # keeps the ReLU mask's compare as a branch and the BN-ReLU backward loops scalar.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    if not with_cuda:
        ext = CppExtension("densenet_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
        return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    sources += sorted(glob.glob(os.path.join(CSRC, "*.cu")))
    ext = CUDAExtension(
        "densenet_fast._C",
        sources,
        define_macros=[("DENSENET_FAST_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
