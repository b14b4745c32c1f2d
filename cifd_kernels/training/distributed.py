# SPDX-License-Identifier: Apache-2.0
"""Data-parallel training under ``torchrun`` (DDP), and the single-process default.

``torchrun --nproc_per_node=N -m cifd_kernels distill ...`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_from_env` reads them and joins the process group (``nccl`` on
CUDA, ``gloo`` on the CPU). Without them the process is a world of one and
nothing here costs anything.

What a data-parallel run means here (so that it is the single-process run,
spread out):

- ``data.batch_size`` is the *global* batch: each of the W ranks gets a
  contiguous 1/W slice of every global batch (the order, one permutation per
  epoch from a generator every rank seeds alike, is padded by wrap-around to a
  multiple of W as ``DistributedSampler`` pads). The global batch of step s is
  the single-process batch of step s, and the learning rate needs no scaling.
- Augmentation offsets and flips are drawn for the whole global batch on every
  rank (same generator) and sliced, so each sample is cropped as it would be
  in one process.
- Philox noise: a rank's samples are rows ``row0 .. row0 + b_local`` of the
  global batch, so noise whose counters run over ``[rows, features]`` (the
  IBM) takes base offset ``row0 * features``: every sample gets the noise it
  would get in one process, and no two ranks share counters. Per-step draws
  that are not per sample (KD-dropout's keep flags) use the same seed and
  offset on every rank, so all ranks drop the same targets.
- BatchNorm sees the global batch: :func:`convert_sync_batchnorm` swaps in
  ``nn.SyncBatchNorm`` on CUDA and :class:`GlobalBatchNorm` (all-reduced
  batch statistics, autograd through the reduction) on the CPU, where
  ``nn.SyncBatchNorm`` does not run.
- Gradients: DDP averages the ranks' gradients of their local batch means,
  which is the gradient of the global batch mean (equal local batch sizes).
- Rank 0 alone writes files (logs, checkpoints, model files, caches, plots)
  and prints; other ranks wait at a barrier where they read what rank 0 wrote.
  Checkpoints hold every rank's RNG state, so ``--resume`` continues exactly
  with the same number of processes.

So a W-process run matches a one-process run with the same global batch up to
floating-point summation order (and the few wrap-around duplicates of the last
batch of an epoch when W does not divide the split).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedSetupError(RuntimeError):
    """The torchrun environment is incomplete or inconsistent."""


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


_CTX = DistContext()


def context() -> DistContext:
    """The current process's place in the run (rank 0 of 1 without torchrun)."""
    return _CTX


def env_world() -> Optional[dict]:
    """The torchrun variables as ints/strings, None when none is set; raises
    :class:`DistributedSetupError` naming what is missing or wrong when only
    some are set (e.g. ``RANK`` exported by hand without ``MASTER_PORT``)."""
    present = {k: os.environ[k] for k in ENV_VARS if os.environ.get(k, "") != ""}
    if not present:
        return None
    if set(present) == {"LOCAL_RANK"} or (set(present) <= {"LOCAL_RANK", "WORLD_SIZE"}
                                          and present.get("WORLD_SIZE") == "1"):
        return None  # a launcher's leftovers of a world of one
    missing = [k for k in ENV_VARS if k not in present]
    if missing:
        raise DistributedSetupError(
            f"incomplete torchrun environment: {', '.join(sorted(present))} set but "
            f"{', '.join(missing)} not. Launch with `torchrun --nproc_per_node=N -m "
            f"cifd_kernels ...` (which sets all of {', '.join(ENV_VARS)}), or unset them "
            f"for a single process")
    out: dict[str, Any] = {}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        try:
            out[k] = int(present[k])
        except ValueError:
            raise DistributedSetupError(f"{k}={present[k]!r} is not an integer") from None
    out["MASTER_ADDR"] = present["MASTER_ADDR"]
    if out["WORLD_SIZE"] < 1 or not 0 <= out["RANK"] < out["WORLD_SIZE"]:
        raise DistributedSetupError(f"RANK={out['RANK']} is outside WORLD_SIZE="
                                    f"{out['WORLD_SIZE']}")
    if out["LOCAL_RANK"] < 0:
        raise DistributedSetupError(f"LOCAL_RANK={out['LOCAL_RANK']} is negative")
    return out


def init_from_env(device: str = "auto", timeout_s: float = 3600.0) -> DistContext:
    """Join the process group described by the torchrun variables (if any) and
    return the context. ``device`` (run.device) picks the backend: ``nccl``
    when the run is on CUDA, ``gloo`` on the CPU. ``timeout_s`` bounds every
    collective, including the barriers where ranks wait for rank 0 to write
    caches and train the RDM bank."""
    global _CTX
    env = env_world()
    if env is None or env["WORLD_SIZE"] == 1:
        _CTX = DistContext()
        return _CTX
    import torch.distributed as dist
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise DistributedSetupError(f"run.device={device} but CUDA is not available")
        if env["LOCAL_RANK"] >= torch.cuda.device_count():
            raise DistributedSetupError(
                f"LOCAL_RANK={env['LOCAL_RANK']} but only {torch.cuda.device_count()} "
                f"CUDA devices: --nproc_per_node must not exceed the GPUs per node")
        torch.cuda.set_device(env["LOCAL_RANK"])
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        # Joined once per process and kept (commands run one after another in
        # one process reuse it: a second group on torchrun's store would read
        # the first one's stale addresses); left at exit.
        dist.init_process_group(backend, init_method="env://", rank=env["RANK"],
                                world_size=env["WORLD_SIZE"],
                                timeout=datetime.timedelta(seconds=timeout_s))
        import atexit
        atexit.register(shutdown)
    _CTX = DistContext(env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], backend)
    return _CTX


def shutdown() -> None:
    global _CTX
    import torch.distributed as dist
    if _CTX.enabled and dist.is_initialized():
        dist.destroy_process_group()
    _CTX = DistContext()


def device_for(name: str) -> torch.device:
    """``run.device`` for this rank: under DDP on CUDA, ``cuda:LOCAL_RANK``."""
    ctx = context()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"run.device={name} but CUDA is not available here")
        if ctx.enabled:
            return torch.device("cuda", ctx.local_rank)
    return dev


# ---------------------------------------------------------------- collectives
def barrier() -> None:
    if context().enabled:
        import torch.distributed as dist
        if context().backend == "nccl":
            dist.barrier(device_ids=[context().local_rank])
        else:
            dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity in one process)."""
    if context().enabled:
        import torch.distributed as dist
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj: Any) -> list:
    """Every rank's ``obj``, indexed by rank (``[obj]`` in one process)."""
    if not context().enabled:
        return [obj]
    import torch.distributed as dist
    out: list = [None] * context().world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not context().enabled:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def single_process():
    """Within the block this process behaves as a world of one (no collectives):
    for work that rank 0 does alone while the others wait (see :func:`on_main`)."""
    global _CTX
    saved = _CTX
    _CTX = DistContext()
    try:
        yield
    finally:
        _CTX = saved


def on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 alone (as a world of one) while the other ranks
    wait; every rank returns rank 0's result, or raises its exception (a
    failure on rank 0 does not leave the others waiting for a timeout)."""
    ctx = context()
    if not ctx.enabled:
        return fn()
    result, error = None, None
    if ctx.is_main:
        try:
            with single_process():
                result = fn()
        except BaseException as e:  # noqa: BLE001 - handed to every rank below
            error = e
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


# -------------------------------------------------------------- modules
class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks with autograd: the gradient of a sum over ranks, w.r.t.
    each rank's input, is the sum over ranks of the output gradients."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t.clone())

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(g.clone())


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch: the
    per-channel count, sum and sum of squares are all-reduced over the ranks
    (with autograd, so gradients flow through the statistics as in
    ``nn.SyncBatchNorm``). Runs on the CPU with gloo, where
    ``nn.SyncBatchNorm`` refuses. Running statistics are updated with the
    global mean and unbiased variance, as one process would. Evaluation mode,
    and a world of one, are plain BatchNorm."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and context().enabled):
            return super().forward(x)
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        # Sums in float64: E[x^2] - E[x]^2 cancels badly in float32 when
        # |mean| >> std, where one process's two-pass variance does not.
        xd = x.double()
        n_local = torch.full((1,), x.numel() // c, dtype=torch.float64, device=x.device)
        stats = _AllReduceSum.apply(torch.cat([xd.sum(dims), (xd * xd).sum(dims), n_local]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                mom = self.momentum if self.momentum is not None else \
                    1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - mom).add_((mom * mean).to(self.running_mean.dtype))
                self.running_var.mul_(1 - mom).add_(
                    (mom * var * n / (n - 1)).to(self.running_var.dtype))
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x.float() - mean.float().view(shape)) * torch.rsqrt(var + self.eps).float().view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers of ``module`` over the global batch (a no-op in one
    process): ``nn.SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm` on the
    CPU. Parameters and buffers are kept (same state-dict keys)."""
    if not context().enabled:
        return module
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)

    def convert(m: nn.Module) -> nn.Module:
        out = m
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, GlobalBatchNorm):
            out = GlobalBatchNorm(m.num_features, m.eps, m.momentum, m.affine,
                                  m.track_running_stats)
            out.load_state_dict(m.state_dict())
            out.train(m.training)
            out.to(next(iter(m.state_dict().values())).device)
        for name, child in m.named_children():
            out.add_module(name, convert(child))
        return out
    return convert(module)


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` (the module itself in one process)."""
    if not context().enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP
    if device.type == "cuda":
        return DDP(module, device_ids=[device.index], output_device=device.index)
    return DDP(module)


def seed_per_rank(seed: int) -> None:
    """After the model is built (from the same seed on every rank), give each
    rank its own stream of torch's global RNG (dropout, DataLoader workers):
    ``seed + 1000003 * rank``. A no-op in one process, which keeps the
    single-process stream."""
    ctx = context()
    if ctx.enabled:
        torch.manual_seed(seed + 1000003 * ctx.rank)
