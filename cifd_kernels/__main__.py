# SPDX-License-Identifier: Apache-2.0
"""``python -m cifd_kernels info`` (versions, backends and why not, what ``_C`` was
built with) and the training CLI (``python -m cifd_kernels <command>``, also
installed as ``cifd``)."""
from __future__ import annotations

import dataclasses

import platform
import sys


def info_text() -> str:
    import torch

    from . import __version__, backend

    lines = [f"cifd_kernels {__version__}",
             f"python       {platform.python_version()} ({sys.executable})",
             f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"]
    try:
        import triton
        lines.append(f"triton       {triton.__version__}"
                     + ("  [TRITON_INTERPRET=1]" if backend.triton_interpret() else ""))
    except Exception as e:
        lines.append(f"triton       not available ({type(e).__name__}: {e})")
    gpu = "none"
    try:
        if torch.cuda.is_available():
            gpu = f"{torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})"
    except Exception as e:  # pragma: no cover
        gpu = f"query failed ({e})"
    lines.append(f"GPU          {gpu}")

    mod, why = backend._load_C()
    if mod is None:
        lines.append(f"_C           not loaded: {why}")
    else:
        archs = mod.CUDA_ARCHS or "-"
        lines.append(f"_C           {mod.__file__}")
        lines.append(f"  built with torch {mod.TORCH_VERSION}, CUDA kernels: "
                     f"{'yes (CUDA ' + mod.CUDA_VERSION + ', archs ' + archs + ')' if mod.WITH_CUDA else 'no'}, "
                     f"OpenMP: {mod.OPENMP or 'no'}, compiler: {mod.COMPILER}")
        if mod.TORCH_VERSION and mod.TORCH_VERSION != torch.__version__:
            lines.append(f"  WARNING: built against torch {mod.TORCH_VERSION}, running {torch.__version__}")

    lines.append("backends (available on cpu / on cuda):")
    for b in backend.BACKENDS:
        cols = []
        for dev in ("cpu", "cuda"):
            ok, reason = backend.status(b, dev)
            cols.append("yes" if ok else f"no ({reason})")
        lines.append(f"  {b:<10} cpu: {cols[0]}")
        lines.append(f"  {'':<10} cuda: {cols[1]}")
    lines.append(f"default backend: {backend.default_backend()} (CIFD_BACKEND)")
    opts = backend.get_kernel_options()
    lines.append("calls on cpu / cuda: one op each with C++ autograd (cifd_C::*_fused), eager "
                 "and traced; triton: " + ("the registered custom ops (eager_via_ops)"
                                           if opts.eager_via_ops else
                                           "one autograd.Function per op eagerly, the registered ops "
                                           "under tracing"))
    lines.append("kernel options (backend.set_kernel_options): " + ", ".join(
        f"{k}={v}" for k, v in dataclasses.asdict(opts).items()))
    lines.append("ops (implemented backends; auto picks on cpu / cuda):")
    from . import ops  # noqa: F401  (registers the ops)
    for op in sorted(backend._IMPLEMENTED):
        picks = [backend.resolve(op, "auto", d) for d in ("cpu", "cuda")]
        lines.append(f"  {op:<22} {', '.join(backend.implemented(op)):<28} auto: {picks[0]} / {picks[1]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["info"]:
        print(info_text())
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m cifd_kernels {info | <training command>} ...  (also: cifd ...)\n"
              "  info                  versions, backends and build facts\n"
              "  <training command>    train-teacher, distill, train-rdms, cache-teacher, eval, demo, download-data")
        if not argv:
            return 2
    try:
        from .training.cli import main as train_main
    except ImportError as e:
        print(f"the training CLI is not available: {e}", file=sys.stderr)
        return 2
    return int(train_main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
