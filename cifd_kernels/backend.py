# SPDX-License-Identifier: Apache-2.0
"""Backend choice, in one place.

Backends: ``cuda`` (the compiled CUDA kernels in ``cifd_kernels._C``), ``triton``
(Triton kernels; on the CPU only under ``TRITON_INTERPRET=1``), ``cpu`` (the
compiled C++ CPU kernels in ``_C``) and ``reference`` (eager PyTorch, always
there). ``auto`` (the default, or ``$CIFD_BACKEND``) picks, per op and device,
the fastest backend that implements the op and is available: on a CUDA device
``cuda`` then ``triton``, on the CPU ``cpu``; the reference when nothing else
is there. Asking for a specific backend that is unavailable, or that does not
implement an op yet, raises :class:`BackendUnavailableError` naming the op and
the reason; ``auto`` never raises for that, it falls back silently (this is
what "auto" means; ``python -m cifd_kernels info`` shows the choice).

The choice is made on the host from the device type alone: no host syncs.

This module is also the package's one place of configuration: the only reader of
environment variables (``CIFD_BACKEND``, ``CIFD_DISABLE_EXT``,
``CIFD_DISABLE_TRITON`` and Triton's own ``TRITON_INTERPRET``; the build reads its
own in ``setup.py``), and the holder of :class:`KernelOptions`, the kernel choices
that leave the math alone (set with :func:`set_kernel_options` or, for a block,
:func:`kernel_options`; nothing else switches a kernel path).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
from typing import Iterator, Optional

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference")
_CHOICES = ("auto",) + BACKENDS

# op name -> backends with an implementation. Ops register here when their
# kernels land; the reference implements every op.
_IMPLEMENTED: dict[str, set[str]] = {}


class BackendUnavailableError(RuntimeError):
    """A specific backend was asked for an op it cannot run here."""


def register(op: str, *backends: str) -> None:
    """Declare that ``op`` has an implementation in each of ``backends``."""
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r}")
    _IMPLEMENTED.setdefault(op, {"reference"}).update(backends)


def implemented(op: str) -> tuple[str, ...]:
    return tuple(b for b in BACKENDS if b in _IMPLEMENTED.get(op, {"reference"}))


@functools.lru_cache(maxsize=None)
def _load_C():
    """(module or None, reason)."""
    if os.environ.get("CIFD_DISABLE_EXT", "0") == "1":
        return None, "disabled by CIFD_DISABLE_EXT=1"
    try:
        mod = importlib.import_module("cifd_kernels._C")
    except ImportError as e:  # not built, or built against another torch
        return None, f"cifd_kernels._C not importable ({e})"
    return mod, ""


def ext():
    """The compiled extension module, or None."""
    return _load_C()[0]


@functools.lru_cache(maxsize=None)
def has_ext_op(name: str) -> bool:
    """Whether ``_C`` is loaded and registers ``cifd_C::<name>`` (a ``_C`` built from
    older sources may lack newer ops)."""
    return ext() is not None and hasattr(torch.ops.cifd_C, name)


@functools.lru_cache(maxsize=None)
def _triton_status():
    if os.environ.get("CIFD_DISABLE_TRITON", "0") == "1":
        return False, "disabled by CIFD_DISABLE_TRITON=1"
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not importable ({e})"
    return True, ""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Kernel choices that change how a result is computed, never what it is.

    Every choice below is a speed or host-time trade-off with a test holding its
    results to the default's (bit for bit, unless the field says otherwise):

    * ``eager_via_ops``: eager calls of the ops registered in Python (the Triton entropy
      op and loss, philox, density pack, ``rdm_linear``) take the route ``torch.compile``
      traces (the registered ``cifd::`` ops) instead of one ``torch.autograd.Function``
      an op (same kernels, same bits, less host time; ``ops/_eager.py``). The entropy op
      and the loss on ``cpu``/``cuda`` have one route either way: the C++-autograd ops
      (``cifd_C::entropy_bottleneck_fused``, ``cifd_C::cifd_loss_fused``).
    * ``save_y_hat``: the entropy op's backward re-reads the density at the saved
      y_hat where that is the same as regenerating the noise (noise mode, rho = 0,
      s = 1, float32/float64); off regenerates it.
    * ``cpu_avx2``: the C++ CPU entropy kernels take their AVX2 + FMA loops when the
      CPU has them; off forces the baseline float32 loops any CPU runs. Both are
      within the kernels' float32 bound of the reference; the bits may differ.
    * ``cuda_bwd_min_blocks``: 1, or 2 for the CUDA float32 entropy backward compiled
      for two blocks an SM (a register cap of 128; an experiment for a GPU to time).
    * ``triton_bwd_maxnreg``: None (the compiler's choice), or Triton's register cap
      per thread for the entropy backward, in [32, 255] (an experiment; ignored by
      the interpreter).
    """
    eager_via_ops: bool = False
    save_y_hat: bool = True
    cpu_avx2: bool = True
    cuda_bwd_min_blocks: int = 1
    triton_bwd_maxnreg: Optional[int] = None

    def __post_init__(self):
        for f in ("eager_via_ops", "save_y_hat", "cpu_avx2"):
            if not isinstance(getattr(self, f), bool):
                raise TypeError(f"{f} must be a bool, got {getattr(self, f)!r}")
        m = self.cuda_bwd_min_blocks
        if isinstance(m, bool) or m not in (1, 2):
            raise ValueError(f"cuda_bwd_min_blocks must be 1 or 2, got {m!r}")
        r = self.triton_bwd_maxnreg
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or not 32 <= r <= 255):
            raise ValueError(f"triton_bwd_maxnreg must be None or an integer in [32, 255], got {r!r}")


_OPTIONS = KernelOptions()
_C_DEFAULTS = (True, 1)  # what a freshly loaded _C holds: (cpu_avx2, cuda_bwd_min_blocks)


def get_kernel_options() -> KernelOptions:
    """The kernel choices in force (:class:`KernelOptions`)."""
    return _OPTIONS


def _push_to_C(opts: KernelOptions) -> None:
    """Hand ``_C`` the choices its host glue copies into every kernel problem."""
    want = (opts.cpu_avx2, opts.cuda_bwd_min_blocks)
    if ext() is None:
        return  # no compiled kernels: nothing reads them
    if has_ext_op("set_kernel_options"):
        torch.ops.cifd_C.set_kernel_options(*want)
    elif want != _C_DEFAULTS:
        raise BackendUnavailableError(
            "cpu_avx2 / cuda_bwd_min_blocks: this cifd_kernels._C predates them "
            "(no cifd_C::set_kernel_options); rebuild it")


def set_kernel_options(**changes) -> KernelOptions:
    """Change some :class:`KernelOptions` fields for every later call (unknown or bad
    values raise, naming the field, and change nothing); returns the previous options."""
    global _OPTIONS
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(KernelOptions)})
    if unknown:
        raise TypeError(f"unknown kernel option(s) {unknown}; known: "
                        f"{[f.name for f in dataclasses.fields(KernelOptions)]}")
    old, new = _OPTIONS, dataclasses.replace(_OPTIONS, **changes)
    _push_to_C(new)
    _OPTIONS = new
    return old


@contextlib.contextmanager
def kernel_options(**changes) -> Iterator[KernelOptions]:
    """``with kernel_options(cpu_avx2=False): ...``: :func:`set_kernel_options` for the
    block, the previous options restored after it (also on an exception)."""
    old = set_kernel_options(**changes)
    try:
        yield _OPTIONS
    finally:
        set_kernel_options(**dataclasses.asdict(old))


def status(backend: str, device_type: str = "cpu") -> tuple[bool, str]:
    """(available, reason if not) of ``backend`` for tensors on ``device_type``."""
    if backend == "reference":
        return True, ""
    if backend == "triton":
        ok, why = _triton_status()
        if not ok:
            return ok, why
        if device_type == "cpu" and not triton_interpret():
            return False, "Triton runs on the CPU only under TRITON_INTERPRET=1"
        if device_type not in ("cpu", "cuda"):
            return False, f"Triton does not run on {device_type}"
        if device_type == "cuda" and not torch.cuda.is_available():
            return False, "no CUDA device is visible"
        return True, ""
    if backend in ("cpu", "cuda"):
        mod, why = _load_C()
        if mod is None:
            return False, why
        if backend == "cpu":
            if device_type != "cpu":
                return False, f"the C++ CPU kernels take CPU tensors, not {device_type}"
            return True, ""
        if not getattr(mod, "WITH_CUDA", False):
            return False, "cifd_kernels._C was built without CUDA"
        if device_type != "cuda":
            return False, f"the CUDA kernels take CUDA tensors, not {device_type}"
        if not torch.cuda.is_available():
            return False, "built with CUDA, but no CUDA device is visible"
        return True, ""
    raise ValueError(f"unknown backend {backend!r}; choose one of {_CHOICES}")


def default_backend() -> str:
    b = os.environ.get("CIFD_BACKEND", "auto").strip().lower() or "auto"
    if b not in _CHOICES:
        raise ValueError(f"CIFD_BACKEND={b!r} is not one of {_CHOICES}")
    return b


def check_backend_name(backend: Optional[str]) -> str:
    b = default_backend() if backend is None else backend
    if not isinstance(b, str) or b.lower() not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {backend!r}")
    return b.lower()


@torch.compiler.assume_constant_result
def _resolve(op: str, backend: Optional[str], device_type: str) -> str:
    # torch.compile calls this at trace time and bakes the answer into the graph.
    return _resolve_eager(op, backend, device_type)


def resolve(op: str, backend: Optional[str], device) -> str:
    """The concrete backend that runs ``op`` for tensors on ``device``.

    Loads ``_C`` (registering the ``cifd_C::`` ops) when it picks cpu or cuda.
    Under torch.compile the choice is made once, at trace time.
    """
    if isinstance(device, torch.device):
        device_type = device.type
    else:
        device_type = torch.device(device).type if device is not None else "cpu"
    return _resolve(op, backend, device_type)


def _resolve_eager(op: str, backend: Optional[str], dtype: str) -> str:
    b = check_backend_name(backend)
    impl = _IMPLEMENTED.get(op, {"reference"})
    if b == "auto":
        order = ("cuda", "triton") if dtype == "cuda" else ("cpu",)
        for cand in order:
            if cand in impl and status(cand, dtype)[0]:
                return cand
        return "reference"
    if b not in impl:
        raise BackendUnavailableError(
            f"{op}: backend {b!r} is not implemented yet (implemented: {', '.join(implemented(op))})")
    ok, why = status(b, dtype)
    if not ok:
        raise BackendUnavailableError(f"{op}: backend {b!r} is unavailable: {why}")
    return b


def resolve_kernel(op: str, backend: Optional[str], device, why_not) -> str:
    """:func:`resolve`, then the call's own fit: ``why_not(be)`` returns None when the
    kernel backend ``be`` takes this call, else what it needs (e.g. "float32
    inputs"). A backend named by the caller that does not fit raises
    :class:`BackendUnavailableError` saying so; ``auto`` (or the ``$CIFD_BACKEND``
    default) falls back to the reference."""
    be = resolve(op, backend, device)
    if be == "reference":
        return be
    why = why_not(be)
    if why is None:
        return be
    if backend is not None and check_backend_name(backend) != "auto":
        raise BackendUnavailableError(f"{op}: backend {be!r} needs {why}")
    return "reference"
