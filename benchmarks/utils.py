# SPDX-License-Identifier: Apache-2.0
"""The benchmark harness: device and version facts, provider availability,
synchronised timing through pytest-benchmark, peak memory, the results file.

A benchmark asks the ``bench`` fixture (``conftest.py``) for a :class:`Bench`
and calls :meth:`Bench.run` once with a zero-argument callable; everything that
makes the number mean something (warm-up, a sync after every timed call, the
median, GB/s, peak memory, device, versions, commit) happens here, so that a
new ``bench_<op>.py`` holds only its providers, shapes and byte count.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"
SCHEMA = "cifd-bench/1"
MODES = ("fwd", "bwd", "full")
KERNEL_BACKENDS = ("cuda", "triton", "cpu")  # providers that are cifd_kernels backends


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip() == "1"


def full_run() -> bool:
    """``CIFD_BENCH_FULL=1``: also the shapes that are too slow for a CPU run."""
    return env_flag("CIFD_BENCH_FULL")


# ---------------------------------------------------------------------------
# device, versions, commit

def bench_device() -> torch.device:
    """``$CIFD_BENCH_DEVICE`` if set, else the current CUDA device, else the CPU."""
    name = os.environ.get("CIFD_BENCH_DEVICE", "").strip()
    if name:
        dev = torch.device(name)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise pytest.UsageError(f"CIFD_BENCH_DEVICE={name} but CUDA is not available")
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.type != "cpu":
            raise pytest.UsageError(f"CIFD_BENCH_DEVICE={name}: only cpu and cuda are benchmarked")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on ``device``: every timed call ends with this."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _nvml_info(index: int) -> dict[str, Any]:
    """Name, driver and memory of CUDA device ``index`` from NVML, matched by UUID
    (NVML numbers devices ignoring CUDA_VISIBLE_DEVICES, so the index can differ)."""
    import pynvml  # nvidia-ml-py

    pynvml.nvmlInit()
    try:
        handle = None
        uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
        for prefix in ("GPU-", "MIG-", ""):
            if not uuid:
                break
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(prefix + uuid)
                break
            except pynvml.NVMLError:
                continue
        if handle is None:
            if os.environ.get("CUDA_VISIBLE_DEVICES"):
                raise RuntimeError("cannot match the CUDA device to an NVML device")
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)

        def s(v):
            return v.decode() if isinstance(v, bytes) else str(v)

        return {
            "name": s(pynvml.nvmlDeviceGetName(handle)),
            "driver": s(pynvml.nvmlSystemGetDriverVersion()),
            "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
            "source": "nvml",
        }
    finally:
        pynvml.nvmlShutdown()


@functools.lru_cache(maxsize=None)
def device_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: ``name`` plus details, by device type."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:
            info = _nvml_info(index)
        except Exception as e:  # no NVML (containers, WSL): torch still knows the name
            info = {"name": torch.cuda.get_device_name(index), "source": f"torch (NVML: {e})"}
        cap = torch.cuda.get_device_capability(index)
        info.update(type="cuda", index=index, capability=f"{cap[0]}.{cap[1]}")
        return info
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = os.cpu_count()
    return {"type": "cpu", "name": _cpu_model(), "logical_cpus": os.cpu_count(),
            "usable_cpus": affinity, "torch_threads": torch.get_num_threads(),
            "source": "/proc/cpuinfo"}


def device_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3`` (for file names)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def _dist_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    """HEAD of the repository, ``-dirty`` when tracked files differ from it;
    ``$CIFD_COMMIT`` when set (copies of the tree without .git, e.g. a GPU machine)."""
    if os.environ.get("CIFD_COMMIT"):
        return os.environ["CIFD_COMMIT"]
    try:
        def git(*args):
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True,
                                  text=True, timeout=10, check=True).stdout.strip()
        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, Optional[str]]:
    import cifd_kernels

    return {
        "torch": torch.__version__,
        "triton": _dist_version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cifd_kernels": cifd_kernels.__version__,
        "compressai": _dist_version("compressai"),
    }


def header(device: torch.device) -> dict[str, Any]:
    """The results file's header: where, with what (kernel options included), from which
    commit, when."""
    from cifd_kernels import backend
    info = device_info(device)
    return {"device": info["name"], "device_info": info, **versions(), "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "kernel_options": dataclasses.asdict(backend.get_kernel_options()), "argv": sys.argv}


KERNEL_OPTION_HELP = ("NAME=VALUE: a cifd_kernels.backend.KernelOptions field for the whole run "
                      "(repeatable), e.g. cpu_avx2=false, cuda_bwd_min_blocks=2, "
                      "triton_bwd_maxnreg=168, save_y_hat=false")


def apply_kernel_options(items: Sequence[str]) -> None:
    """Set the ``NAME=VALUE`` kernel options (``--kernel-option``) for the whole run:
    true/false for the switches, an integer or none for the numbers. A bad item raises
    SystemExit naming it."""
    from cifd_kernels import backend
    changes = {}
    for item in items:
        name, sep, raw = item.partition("=")
        low = raw.strip().lower()
        if not sep or not name.strip():
            raise SystemExit(f"--kernel-option {item!r}: expected NAME=VALUE")
        if low in ("true", "false"):
            value = low == "true"
        elif low == "none":
            value = None
        else:
            try:
                value = int(low)
            except ValueError:
                raise SystemExit(f"--kernel-option {item!r}: VALUE must be true, false, none or an "
                                 "integer") from None
        changes[name.strip()] = value
    try:
        backend.set_kernel_options(**changes)
    except (TypeError, ValueError, backend.BackendUnavailableError) as e:
        raise SystemExit(f"--kernel-option: {e}") from None


# ---------------------------------------------------------------------------
# providers

def _have_cxx() -> bool:
    names = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    return any(n and shutil.which(n) for n in names)


def provider_status(provider: str, device_type: str, op: Optional[str] = None) -> tuple[bool, str]:
    """(available, reason if not) of a provider for tensors on ``device_type``.

    Providers: ``cuda``/``triton``/``cpu`` are cifd_kernels backends
    (:func:`cifd_kernels.backend.status`, and ``op`` must implement them);
    ``reference`` is the eager reference; ``torch`` a plain-torch speed-of-light
    row; ``compiled`` torch.compile of the reference; ``compressai`` CompressAI.
    Triton is benchmarked on a CUDA GPU only: the interpreter is a correctness
    tool, its timings mean nothing.
    """
    from cifd_kernels import backend

    if provider in ("reference", "torch"):
        return True, ""
    if provider == "compressai":
        if importlib.util.find_spec("compressai") is None:
            return False, "compressai is not installed"
        return True, ""
    if provider == "compiled":
        if device_type == "cpu" and not _have_cxx():
            return False, "torch.compile on the CPU needs a C++ compiler"
        if device_type == "cuda" and importlib.util.find_spec("triton") is None:
            return False, "torch.compile on CUDA needs triton"
        return True, ""
    if provider in KERNEL_BACKENDS:
        if op is not None and provider not in backend.implemented(op):
            return False, f"{op} has no {provider} kernels yet"
        if provider == "triton":
            if backend.triton_interpret():
                return False, "TRITON_INTERPRET=1: the interpreter is not benchmarked"
            if device_type != "cuda":
                return False, "Triton is benchmarked on a CUDA GPU only"
        return backend.status(provider, device_type)
    raise ValueError(f"unknown provider {provider!r}")


# ---------------------------------------------------------------------------
# timing and memory

@dataclasses.dataclass(frozen=True)
class Budget:
    """How long to spend on one benchmark (see :func:`warm_up`): ``warmup`` plain
    calls, one memory-profiled call, timed calls until ``warmup_s`` has passed
    (at most ``max_warmup``); then ``rounds = budget_s / fastest warm-up call``,
    clamped to [min_rounds, max_rounds]. ``$CIFD_BENCH_BUDGET`` (seconds)
    overrides budget_s."""
    warmup: int
    warmup_s: float
    max_warmup: int
    budget_s: float
    min_rounds: int
    max_rounds: int

    def rounds(self, t_call: float) -> int:
        budget = float(os.environ.get("CIFD_BENCH_BUDGET", self.budget_s))
        return max(self.min_rounds, min(self.max_rounds, int(budget / max(t_call, 1e-9))))


# The CPU run of the whole suite must stay short (2 cores in CI); a GPU can afford more.
CPU_BUDGET = Budget(warmup=0, warmup_s=0.1, max_warmup=10, budget_s=0.6, min_rounds=3, max_rounds=50)
CUDA_BUDGET = Budget(warmup=3, warmup_s=0.2, max_warmup=100, budget_s=0.5, min_rounds=10, max_rounds=2000)


def default_budget(device: torch.device) -> Budget:
    return CUDA_BUDGET if device.type == "cuda" else CPU_BUDGET


def warm_up(fn: Callable[[Any], Any], setup: Callable[[], Any], device: torch.device,
            budget: Budget, warmup: Optional[int] = None) -> tuple[float, Optional[int], str]:
    """Warm ``fn`` up and measure its peak memory; return (seconds, peak bytes, method).

    ``fn(setup())`` is one call, ``setup`` untimed (see :class:`Timed`).
    Order: ``warmup`` plain calls (default ``budget.warmup``; >= 1 when the
    first call compiles), then one call under :func:`peak_memory` (it warms
    too), then more timed calls until ``budget.warmup_s`` has passed. Every call
    is synchronised. The seconds returned are the fastest timed call (the
    profiled call only if no other was timed): the fastest, not the first, since
    a first call may compile. Folding the memory call into warm-up saves one
    call per benchmark, which matters for the multi-second CPU references."""
    n_min = budget.warmup if warmup is None else warmup
    times: list[float] = []

    def timed_call():
        state = setup()
        synchronize(device)
        t0 = time.perf_counter()
        fn(state)
        synchronize(device)
        times.append(time.perf_counter() - t0)

    for _ in range(n_min):
        timed_call()
    start = time.perf_counter()
    state = setup()
    t0 = time.perf_counter()
    peak, method = peak_memory(lambda: fn(state), device)
    t_profiled = time.perf_counter() - t0
    del state
    while time.perf_counter() - start < budget.warmup_s and len(times) < budget.max_warmup:
        timed_call()
    return (min(times) if times else t_profiled), peak, method


PEAK_MEM_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated during one call minus memory_allocated before it",
    "cpu": "peak running sum of CPU allocator events (torch.profiler profile_memory) during one call",
}


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[Optional[int], str]:
    """Peak bytes that one call of ``fn`` allocates through torch beyond what was
    allocated before it: outputs plus temporaries, not inputs, parameters or
    tensors saved by an earlier forward. Returns (bytes or None, method).

    CUDA: the caching allocator's own peak counter. CPU: torch has no peak
    counter for the CPU allocator, and RSS does not fall when the allocator
    frees, so the profiler's allocation events (+bytes on malloc, -bytes on
    free, in time order) are summed and their running maximum taken. Memory
    that a library allocates outside torch (e.g. oneDNN scratch) is not seen."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak), PEAK_MEM_METHOD["cuda"]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    try:
        events = prof.profiler.kineto_results.events()
        allocs = sorted((e.start_ns(), e.nbytes()) for e in events
                        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    except Exception as e:  # private profiler API moved: say so rather than guess
        return None, f"unavailable ({type(e).__name__}: {e})"
    running = peak = 0
    for _, nbytes in allocs:
        running += nbytes
        peak = max(peak, running)
    return int(peak), PEAK_MEM_METHOD["cpu"]


@dataclasses.dataclass(frozen=True)
class Timed:
    """A call to time with an untimed ``setup`` before each call: each round runs
    ``state = setup()``, syncs, then times ``fn(state)`` (and its sync)."""
    fn: Callable[[Any], Any]
    setup: Callable[[], Any]


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _differentiable(outs) -> tuple[torch.Tensor, ...]:
    return tuple(o for o in _as_tuple(outs) if isinstance(o, torch.Tensor) and o.requires_grad)


def mode_fn(mode: str, forward: Callable[[], Any], inputs: Sequence[torch.Tensor],
            seed: int = 0, retain_graph: bool = True) -> Callable[[], Any] | Timed:
    """What to time for ``mode``, from a ``forward()`` and the leaf tensors
    (inputs and parameters) that need gradients.

    * ``fwd``: ``forward()`` with autograd recording, i.e. the training forward
      (it saves what backward needs).
    * ``bwd``: backward only, ``torch.autograd.grad(outputs, inputs, grad_outputs)``.
      With ``retain_graph=True`` one forward runs here, untimed, and every call
      differentiates that graph again (``retain_graph=True``). With False each
      call gets a fresh graph from an untimed forward (a :class:`Timed`): needed
      by compiled graphs whose backward donates its saved buffers, which
      forbids retain_graph (torch._functorch.config.donated_buffer).
    * ``full``: ``forward()`` then the same ``torch.autograd.grad`` (no retain).

    ``grad_outputs`` are fixed standard-normal tensors, one per differentiable
    output, so bwd and full differentiate the random-weighted sum
    ``sum_k <g_k, out_k>`` of every output (never ``.sum()``, whose all-ones
    gradient can hide indexing bugs and lets kernels take shortcuts).
    ``torch.autograd.grad`` returns gradients instead of accumulating into
    ``.grad``, so repeated calls do identical work."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "fwd":
        return forward
    inputs = tuple(inputs)
    outs = _differentiable(forward())
    if not outs:
        raise ValueError("forward() returned no output that requires grad")
    gen = torch.Generator().manual_seed(seed)
    grads = tuple(torch.randn(o.shape, generator=gen, dtype=torch.float32).to(o.device, o.dtype)
                  for o in outs)
    if mode == "bwd" and retain_graph:
        return lambda: torch.autograd.grad(outs, inputs, grads, retain_graph=True, allow_unused=True)
    del outs

    def backward(outs):
        return torch.autograd.grad(outs, inputs, grads, allow_unused=True)

    if mode == "bwd":
        return Timed(fn=backward, setup=lambda: _differentiable(forward()))
    return lambda: backward(_differentiable(forward()))


def run_modes(bench, *, op: str, provider: str, shape, mode: str, dtype: torch.dtype,
              forward: Callable[[], Any], leaves: Sequence[torch.Tensor], bytes_moved: int,
              baseline: str) -> None:
    """The body every provider x shape x mode benchmark shares: :func:`mode_fn` (the
    compiled provider without retain_graph: its backward donates saved buffers) and
    ``bench.run`` (one warm-up call for compiled graphs, the default otherwise)."""
    fn = mode_fn(mode, forward, leaves, retain_graph=provider != "compiled")
    bench.run(fn, op=op, provider=provider, shape=shape, mode=mode, dtype=dtype,
              bytes_moved=bytes_moved, baseline=baseline,
              warmup=1 if provider == "compiled" else None)


def shape_id(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class Bench:
    """One benchmark's harness (the ``bench`` fixture): skips, timing, records."""

    def __init__(self, benchmark, device: torch.device, records: list, name: str, nodeid: str):
        self.benchmark = benchmark
        self.device = device
        self._records = records
        self._name = name
        self._nodeid = nodeid

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def require(self, provider: str, op: Optional[str] = None) -> None:
        """Skip, with the reason, when ``provider`` cannot run here."""
        ok, why = provider_status(provider, self.device.type, op)
        if not ok:
            pytest.skip(f"{provider}: {why}")

    def require_big(self, what: str) -> None:
        """Skip a shape meant for GPUs on a CPU run unless CIFD_BENCH_FULL=1."""
        if not self.on_gpu and not full_run():
            pytest.skip(f"{what}: GPU-sized; on the CPU only with CIFD_BENCH_FULL=1")

    def run(self, fn: Callable[[], Any] | Timed, *, op: str, provider: str, shape: Sequence[int],
            mode: str, dtype: torch.dtype, bytes_moved: int, baseline: str,
            warmup: Optional[int] = None, budget: Optional[Budget] = None) -> Optional[dict]:
        """Time ``fn`` and record it.

        Args:
            fn: zero-argument callable doing exactly the work to time, or a
                :class:`Timed` with an untimed per-call setup (see
                :func:`mode_fn` for bwd/full); a sync is added after each call.
            op, provider, shape, mode, dtype: what is measured (shape: the
                problem shape, e.g. (B, C), not necessarily one tensor's).
            bytes_moved: the minimal traffic of the op, inputs read once plus
                outputs written once, in bytes; GB/s = bytes_moved / median / 1e9.
            baseline: the provider that speed-ups are computed against in plots.
            warmup: plain calls before the memory-profiled one (default from
                the budget: 0 on the CPU, 3 on CUDA); pass >= 1 when the first
                call compiles (torch.compile, Triton JIT), so that neither the
                memory nor the timing sees the compilation.

        Returns the record written to the results file, or None when
        pytest-benchmark is disabled (``--benchmark-disable``: one plain call).
        """
        bm = self.benchmark
        bm.group = f"{op} {mode}"
        dev = self.device
        budget = budget or default_budget(dev)

        if isinstance(fn, Timed):
            call, setup = fn.fn, fn.setup
        else:
            call, setup = (lambda _state, f=fn: f()), (lambda: None)

        def timed(state):
            call(state)
            synchronize(dev)

        def timed_setup():
            state = setup()
            synchronize(dev)
            return (state,), {}

        synchronize(dev)
        if getattr(bm, "disabled", False):
            bm(lambda: timed(setup()))
            return None
        t_warm, peak, peak_method = warm_up(call, setup, dev, budget, warmup)
        bm.pedantic(timed, setup=timed_setup, rounds=budget.rounds(t_warm), warmup_rounds=0,
                    iterations=1)
        st = bm.stats.stats
        median = float(st.median)
        info = {
            "op": op, "provider": provider, "shape": [int(s) for s in shape], "mode": mode,
            "dtype": str(dtype).replace("torch.", ""), "baseline": baseline,
            "bytes": int(bytes_moved), "gbps": bytes_moved / median / 1e9 if median > 0 else None,
            "peak_mem_bytes": peak, "peak_mem_method": peak_method,
            "device": device_info(dev)["name"], **versions(), "commit": git_commit(),
        }
        bm.extra_info.update(info)
        record = {
            "name": self._name, "nodeid": self._nodeid, "group": bm.group, **info,
            "median_s": median, "mean_s": float(st.mean), "stddev_s": float(st.stddev),
            "min_s": float(st.min), "max_s": float(st.max), "rounds": int(st.rounds),
        }
        self._records.append(record)
        return record


# ---------------------------------------------------------------------------
# results file

def script_args(ap, argv, count: str, minimum: int):
    """The stand-alone measurement scripts' shared options (``--threads``, ``--device``,
    ``--out``, ``--kernel-option``) added to ``ap``, parsed, checked (``--<count>`` at least ``minimum``) and
    applied (torch threads): returns ``(args, device)``."""
    ap.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: leave)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None,
                    help="results folder (default $CIFD_BENCH_OUT or benchmarks/results)")
    ap.add_argument("--kernel-option", action="append", default=[], metavar="NAME=VALUE",
                    help=KERNEL_OPTION_HELP)
    args = ap.parse_args(argv)
    if getattr(args, count) < minimum:
        raise SystemExit(f"--{count} must be at least {minimum}")
    apply_kernel_options(args.kernel_option)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args, torch.device(args.device)


def write_results(records: list[dict], device: torch.device, out_dir: Optional[os.PathLike] = None) -> Path:
    """Write ``<out_dir>/<device-slug>-<UTC timestamp>.json`` and return its path.

    ``out_dir``: argument, else ``$CIFD_BENCH_OUT``, else ``benchmarks/results``."""
    out = Path(out_dir or os.environ.get("CIFD_BENCH_OUT") or DEFAULT_OUT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    head = header(device)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"{device_slug(head['device'])}-{stamp}.json"
    n = 1
    while path.exists():  # two sessions in the same second
        path = out / f"{device_slug(head['device'])}-{stamp}-{n}.json"
        n += 1
    payload = {"schema": SCHEMA, "header": head, "benchmarks": records}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path
