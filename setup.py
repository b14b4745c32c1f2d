# SPDX-License-Identifier: Apache-2.0
"""Build of cifd_kernels._C: the C++ CPU kernels always, the CUDA kernels when
this torch is a CUDA build and nvcc is present (never decided by whether a GPU
is visible). ``CIFD_BUILD_EXT=auto|0|1`` (default auto):

* ``0``: pure Python (the reference and Triton backends only);
* ``1``: the extension must build; a failure fails the install;
* ``auto``: build it; CUDA parts iff torch.version.cuda and nvcc are found.

``CIFD_WITH_CUDA=0|1`` forces the CUDA part off/on; ``TORCH_CUDA_ARCH_LIST``
picks the archs (default "8.0;9.0+PTX"). Objects go to a build folder outside the
source tree ($CIFD_BUILD_DIR, default under the system temp dir), so
``pip install .`` writes nothing into the checkout.
"""
import glob
import hashlib
import os
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"[cifd_kernels build] {msg}", file=sys.stderr, flush=True)


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _build_dir() -> str:
    d = os.environ.get("CIFD_BUILD_DIR")
    if not d:
        tag = hashlib.sha1(ROOT.encode()).hexdigest()[:10]
        d = os.path.join(tempfile.gettempdir(), f"cifd_kernels_build_{tag}")
    return d


def _extensions():
    mode = os.environ.get("CIFD_BUILD_EXT", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"CIFD_BUILD_EXT must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        _say("CIFD_BUILD_EXT=0: not building cifd_kernels._C (reference and Triton backends only)")
        return [], {}
    if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # before torch looks for nvcc on PATH
    try:
        import torch
        from torch.utils import cpp_extension as cx
    except ImportError as e:
        if mode == "1":
            raise SystemExit(f"CIFD_BUILD_EXT=1 but torch is not importable ({e}); install torch first")
        _say(f"torch not importable ({e}): not building cifd_kernels._C")
        return [], {}

    want_cuda = os.environ.get("CIFD_WITH_CUDA", "auto").strip().lower()
    nvcc = os.path.join(cx.CUDA_HOME, "bin", "nvcc") if cx.CUDA_HOME else None
    if want_cuda == "0":
        with_cuda, why = False, "CIFD_WITH_CUDA=0"
    elif torch.version.cuda is None:
        with_cuda, why = False, f"torch {torch.__version__} is not a CUDA build"
    elif not nvcc or not os.path.exists(nvcc):
        with_cuda, why = False, "nvcc not found (set CUDA_HOME)"
    else:
        with_cuda, why = True, f"torch CUDA {torch.version.cuda}, nvcc at {nvcc}"
    if want_cuda == "1" and not with_cuda:
        raise SystemExit(f"CIFD_WITH_CUDA=1 but the CUDA part cannot be built: {why}")

    sources = _rel(glob.glob(os.path.join(ROOT, "python", "*.cpp")))
    sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "python")]
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fvisibility=hidden"]
    macros = [("CIFD_TORCH_VERSION", f'"{torch.__version__}"')]
    ext_cls = cx.CppExtension
    extra = {"cxx": cxx}
    if with_cuda:
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        macros += [("CIFD_WITH_CUDA", "1"), ("CIFD_CUDA_ARCHS", f'"{archs}"'),
                   ("CIFD_CUDA_VERSION", f'"{torch.version.cuda}"')]
        # pip's CUDA wheels carry headers torch's CUDA headers may reach for.
        for sp in sys.path:
            inc = os.path.join(sp, "nvidia", "cu13", "include")
            if os.path.isdir(inc):
                include_dirs.append(inc)
                break
        extra["nvcc"] = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]
        ext_cls = cx.CUDAExtension
        _say(f"building cifd_kernels._C with C++ CPU and CUDA kernels ({why}; archs {archs})")
    else:
        _say(f"building cifd_kernels._C with C++ CPU kernels only (no CUDA: {why})")
    # --exclude-libs: where a toolchain links a static libstdc++ (the lent H200's /opt/gcc
    # g++ did: _C needed no libstdc++.so), its symbols stay private to _C. Exported, they
    # mixed with the libstdc++ torch loaded: formatting an integer into any C++ error
    # message segfaulted there (2026-12-04). A shared libstdc++ is untouched by it.
    link = ["-fopenmp"] + (["-Wl,--exclude-libs,ALL"] if sys.platform.startswith("linux") else [])
    ext = ext_cls("cifd_kernels._C", sources, include_dirs=include_dirs, define_macros=macros,
                  extra_compile_args=extra, extra_link_args=link,
                  py_limited_api=False)
    cmd = {"build_ext": cx.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmd


ext_modules, cmdclass = _extensions()
build_dir = _build_dir()
os.makedirs(build_dir, exist_ok=True)  # egg-info goes there too, not into the checkout

setup(
    packages=find_packages(include=["cifd_kernels", "cifd_kernels.*"]),
    package_data={"cifd_kernels": ["training/configs/*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"build": {"build_base": build_dir}, "egg_info": {"egg_base": build_dir}},
    zip_safe=False,
)
