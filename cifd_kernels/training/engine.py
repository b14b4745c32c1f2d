# SPDX-License-Identifier: Apache-2.0
"""The epoch loop shared by every recipe, and what makes runs resumable.

A run directory holds::

    config.yaml      the full configuration of the run
    checkpoint.pt    training state after the last finished epoch (atomic)
    model.pt         the model with the best validation accuracy so far (atomic)
    metrics.jsonl    one JSON object per epoch (+ a final "test" record);
                     epoch_time_s / epoch_cpu_s (wall / process CPU seconds)
                     cover the training pass only, not validation
    summary.json     written when the run finishes

``checkpoint.pt`` holds the trainable modules, optimizer, LR scheduler, the
batch iterator's generators, torch's (CPU and CUDA) and Python's RNG states,
the epoch and the best validation accuracy, and the config hash; resuming
from it continues to the same final weights as an uninterrupted run (same
machine, same thread count). A checkpoint written under another config hash
is refused, with the keys that differ.

The torch files of a run (checkpoint.pt, model.pt, the RDM bank's bank.pt,
the teacher-output cache) carry ``format_version`` (:data:`FORMAT_VERSION`)
and are read back by :func:`load_file`: with ``weights_only=True``, and a file
that is damaged, of another kind or from a newer cifd_kernels is refused by
one :class:`RunFileError` naming it (files without a version are version 0).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TrainConfig, diff_items
from .data import guard_read


class CheckpointMismatchError(RuntimeError):
    """A checkpoint belongs to another configuration (or another model)."""


class RunFileError(RuntimeError):
    """A file of a run (checkpoint, model, RDM bank, teacher-output cache,
    metrics log) is damaged, holds something else, or comes from a newer
    cifd_kernels."""


# The layout of the torch files written here; a reader refuses a newer one.
FORMAT_VERSION = 1


def load_file(path: str | os.PathLike, kind: str, fix: str, keys: Iterable[str] = (),
              map_location="cpu") -> dict:
    """The dict saved in ``path`` by this package (``kind``: "checkpoint",
    "cifd model file", ...), loaded with ``torch.load(weights_only=True)``
    (tensors and plain containers, no code runs). Raises :class:`RunFileError`
    naming ``path``, followed by ``fix`` (what to do), when the file cannot be
    read (truncated, corrupt, not a torch file, not a dict with ``keys``) or
    its ``format_version`` is newer than :data:`FORMAT_VERSION`."""
    with guard_read(path, kind, fix, RunFileError):
        try:
            blob = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's refusal is a page of advice; keep the line that says what it refused.
            said = str(e).split("WeightsUnpickler error:", 1)[-1].strip()
            raise pickle.UnpicklingError(said.splitlines()[0].split(". ")[0]) from e
    if not isinstance(blob, dict):
        raise RunFileError(f"{path} is not a {kind} (it holds a {type(blob).__name__}). {fix}")
    version = blob.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise RunFileError(
            f"{path} was written by a newer cifd_kernels ({kind} format {version!r}; this "
            f"one reads up to {FORMAT_VERSION}): upgrade cifd_kernels to read it")
    missing = [k for k in keys if k not in blob]
    if missing:
        raise RunFileError(f"{path} is not a {kind} (no {', '.join(missing)}). {fix}")
    return blob


# ------------------------------------------------------------------ helpers
def select_device(name: str = "auto") -> torch.device:
    """``run.device`` (auto, cpu, cuda, cuda:N); under DDP on CUDA, this rank's GPU."""
    from .distributed import device_for
    return device_for(name)


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def weights_hash(module_or_state: nn.Module | dict) -> str:
    """sha256 (16 hex chars) of a state dict's names, dtypes, shapes and bytes."""
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) \
        else module_or_state
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            h.update(f"{name}={t!r}".encode())
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same directory, fsync, then
    os.replace: readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


class MetricsLog:
    """Append-only JSON-lines log. On resume from epoch ``keep_through``,
    records of later epochs (written before a crash, after the checkpoint)
    are dropped so the log matches the state."""

    def __init__(self, path: str | os.PathLike, keep_through: Optional[int] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_through is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("epoch", 0) <= keep_through]
            atomic_write_text("".join(json.dumps(r) + "\n" for r in kept), self.path)

    def log(self, **record) -> None:
        record.setdefault("time", round(time.time(), 3))
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def read(self) -> list[dict]:
        return read_metrics(self.path)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl. A last line cut short (a crash while
    logging, before that epoch's checkpoint) is dropped; a damaged line before
    it raises :class:`RunFileError`."""
    lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
            if isinstance(rec, dict):
                out.append(rec)
                continue
        except json.JSONDecodeError:
            pass
        if i < len(lines) - 1:
            raise RunFileError(f"{path}: line {i + 1} is not a JSON record: repair or delete "
                               f"that line, or start the run again with --overwrite")
    return out


def progress_enabled(flag: bool) -> bool:
    return flag and sys.stderr.isatty()


# ---------------------------------------------------------- optim / schedule
class LRSchedule:
    """Multiplier of the peak LR at optimizer step ``s``: linear warm-up over
    ``warmup`` steps, then cosine to 0, step decay, or constant. A class, not
    a lambda, so LambdaLR's state_dict keeps it."""

    def __init__(self, kind: str, total: int, warmup: int = 0,
                 milestones: Iterable[int] = (), gamma: float = 0.1):
        self.kind, self.total, self.warmup = kind, max(total, 1), warmup
        self.milestones, self.gamma = sorted(milestones), gamma

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / self.warmup
        if self.kind == "cosine":
            t = (s - self.warmup) / max(self.total - self.warmup, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
        if self.kind == "step":
            return self.gamma ** sum(s >= m for m in self.milestones)
        return 1.0


def fused_kwargs(params) -> dict:
    """``{"fused": True}`` when every parameter is a floating-point tensor on the CPU or
    a CUDA device (torch's fused SGD/Adam/AdamW kernels: one call for all tensors
    instead of a dozen small ops per tensor; on the CPU 5x faster for the RDM bank's
    25 tensors, 0.54 vs 2.9 ms a step), else ``{}`` (the for-loop path)."""
    ps = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    ok = bool(ps) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in ps)
    return {"fused": True} if ok else {}


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay, **fused_kwargs(params))
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 **fused_kwargs(params))
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step."""
    sched = LRSchedule(cfg.schedule, cfg.epochs * steps_per_epoch,
                       int(round(cfg.warmup_epochs * steps_per_epoch)),
                       [m * steps_per_epoch for m in cfg.milestones], cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, sched)


# ------------------------------------------------------------------ eval
@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable, *, progress: bool = False,
             desc: str = "eval") -> dict:
    """Mean cross-entropy and top-1 accuracy of ``model`` over ``batches``
    (objects with ``.x``, ``.y``, or ``(x, y)`` pairs)."""
    from tqdm.auto import tqdm
    was_training = model.training
    model.eval()
    loss_sum = correct = None  # on the batches' device: no host sync per batch
    n = 0
    for b in tqdm(batches, desc=desc, leave=False, disable=not progress_enabled(progress)):
        x, y = (b.x, b.y) if hasattr(b, "x") else b
        logits = model(x)
        if loss_sum is None:
            loss_sum = torch.zeros((), dtype=torch.float64, device=y.device)
            correct = torch.zeros((), dtype=torch.int64, device=y.device)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
        n += y.shape[0]
    model.train(was_training)
    if getattr(batches, "world_size", 1) > 1:
        # A shard of the split per rank (make_iterator(train=False) shards
        # without padding): sum over ranks. A rank may hold no batch.
        from .distributed import all_reduce_sum
        dev = y.device if loss_sum is not None else _collective_device()
        tot = torch.zeros(3, dtype=torch.float64, device=dev)
        if loss_sum is not None:
            tot[0], tot[1], tot[2] = loss_sum, correct.double(), n
        all_reduce_sum(tot)
        loss_sum, correct, n = tot[0], tot[1], int(tot[2].item())
    if loss_sum is None or n == 0:
        raise ValueError(f"{desc}: no batches to evaluate")
    return {"loss": (loss_sum / max(n, 1)).item(), "acc": round(correct.item()) / max(n, 1),
            "n": n}


def _collective_device() -> torch.device:
    from .distributed import context
    if context().backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------ fit
@dataclass
class RunIdentity:
    """What a checkpoint must match to be resumed: the config hash, and the
    hashed items (to say which keys differ when it does not)."""
    config_hash: str
    items: dict
    config: dict


RESUME_FIX = ("It cannot be resumed: start the run again with --overwrite (which replaces "
              "it), or restore a good copy")


def load_checkpoint(path: str | os.PathLike, ident: Optional[RunIdentity] = None,
                    map_location="cpu") -> dict:
    """A checkpoint.pt (:func:`load_file`), refused when written under another
    config hash than ``ident``'s."""
    ckpt = load_file(path, "checkpoint", RESUME_FIX,
                     ("modules", "optimizer", "scheduler", "data", "epoch", "config_hash"),
                     map_location)
    if ident is not None and ckpt.get("config_hash") != ident.config_hash:
        diffs = diff_items(ckpt.get("config_items", {}), ident.items)
        raise CheckpointMismatchError(
            f"{path} was written by another configuration (hash "
            f"{ckpt.get('config_hash')} != {ident.config_hash}); differences "
            f"(checkpoint -> now): {'; '.join(diffs) or 'none recorded'}. Resume with "
            f"the original settings, or start a new run (another run.name, or "
            f"--overwrite).")
    return ckpt


StepFn = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]


def fit(*, run_dir: str | os.PathLike, modules: nn.Module, model: nn.Module, step_fn: StepFn,
        train_iter, val_iter, optimizer: torch.optim.Optimizer, scheduler, epochs: int,
        ident: RunIdentity, model_meta: dict, resume: bool = False, overwrite: bool = False,
        progress: bool = True, stop_after: int = 0, log_prefix: str = "") -> dict:
    """Train for ``epochs`` epochs, checkpointing after each.

    ``modules``: everything trainable and saved (the model, plus e.g. an IBM);
    ``model``: the classifier evaluated on ``val_iter`` and saved to model.pt.
    ``step_fn(batch) -> (loss, logits)``: forward of one batch; ``fit`` does
    backward, optimizer and scheduler steps. ``model_meta`` (arch, classes, ...)
    goes into model.pt so that it can be rebuilt without the config.
    ``stop_after`` > 0 returns after that many epochs of this call, with
    ``complete`` False in the summary (the checkpoint is then resumable).
    Returns the summary (best epoch, best validation accuracy, paths, complete).
    """
    from tqdm.auto import tqdm
    from .distributed import all_gather_object, all_reduce_sum, barrier, context
    ctx = context()
    main = ctx.is_main
    progress = progress and main
    run_dir = Path(run_dir)
    ckpt_path, best_path = run_dir / "checkpoint.pt", run_dir / "model.pt"
    start_epoch, best = 0, {"val_acc": -1.0, "epoch": 0}
    if ckpt_path.exists() and not (resume or overwrite):
        raise FileExistsError(
            f"{ckpt_path} exists: pass --resume to continue that run, --overwrite to "
            f"start it again, or choose another run.name / run.out_dir")
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, ident)
        saved_world = ckpt.get("world_size", 1)
        if saved_world != ctx.world_size:
            raise CheckpointMismatchError(
                f"{ckpt_path} was written by a run of {saved_world} process(es), this one "
                f"has {ctx.world_size}: resume with the same torchrun --nproc_per_node "
                f"(per-rank random states are in the checkpoint), or start a new run")
        with guard_read(ckpt_path, "checkpoint", RESUME_FIX, RunFileError):
            modules.load_state_dict(ckpt["modules"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            train_iter.load_state_dict(ckpt["data"])
            set_rng_state(ckpt["rank_rng"][ctx.rank] if "rank_rng" in ckpt else ckpt["rng"])
            start_epoch, best = ckpt["epoch"], ckpt["best"]
        if main:
            print(f"{log_prefix}resuming {run_dir} after epoch {start_epoch}/{epochs}",
                  flush=True)
    barrier()  # every rank has read the checkpoint before rank 0 may replace it
    log = MetricsLog(run_dir / "metrics.jsonl",
                     keep_through=start_epoch if (resume and start_epoch) else None) \
        if main else None
    from .config import from_dict, dump_yaml
    if main:
        atomic_write_text(dump_yaml(from_dict(ident.config)), run_dir / "config.yaml")

    end_epoch = min(epochs, start_epoch + stop_after) if stop_after > 0 else epochs
    for epoch in range(start_epoch, end_epoch):
        modules.train()
        t0, c0 = time.perf_counter(), time.process_time()
        loss_sum = correct = None  # on the batches' device: no host sync per step
        n = 0
        bar = tqdm(train_iter, total=len(train_iter), leave=False, dynamic_ncols=True,
                   desc=f"{log_prefix}epoch {epoch + 1}/{epochs}",
                   disable=not progress_enabled(progress))
        for i, batch in enumerate(bar):
            loss, logits = step_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bs = batch.y.shape[0]
            if loss_sum is None:
                loss_sum = torch.zeros((), dtype=torch.float64, device=batch.y.device)
                correct = torch.zeros((), dtype=torch.int64, device=batch.y.device)
            loss_sum += loss.detach().double() * bs
            correct += (logits.detach().argmax(1) == batch.y).sum()
            n += bs
            if i % 20 == 0 and bar.disable is False:
                bar.set_postfix(loss=f"{loss_sum.item() / n:.4f}",
                                lr=f"{optimizer.param_groups[0]['lr']:.3g}")
        if loss_sum is None:
            raise ValueError("the training split yields no batches (data.batch_size larger "
                             "than the split with drop_last?)")
        if loss_sum.device.type == "cuda":
            torch.cuda.synchronize(loss_sum.device)
        train_time, cpu_time = time.perf_counter() - t0, time.process_time() - c0
        if ctx.enabled:  # the global batch's sums (padding duplicates included)
            tot = all_reduce_sum(torch.stack([loss_sum, correct.double(),
                                              torch.full_like(loss_sum, n)]))
            loss_sum, correct, n = tot[0], tot[1], int(tot[2].item())
        val = evaluate(model, val_iter, progress=progress, desc=f"{log_prefix}val")
        record = {"epoch": epoch + 1, "train_loss": loss_sum.item() / max(n, 1),
                  "train_acc": round(correct.item()) / max(n, 1), "val_loss": val["loss"],
                  "val_acc": val["acc"], "lr": optimizer.param_groups[0]["lr"],
                  "epoch_time_s": round(train_time, 3), "epoch_cpu_s": round(cpu_time, 3),
                  "images_per_s": round(n / max(train_time, 1e-9), 1),
                  "threads": torch.get_num_threads()}
        if ctx.enabled:
            record["processes"] = ctx.world_size
        rank_rng = all_gather_object(rng_state()) if ctx.enabled else None
        improved = val["acc"] > best["val_acc"]  # the same on every rank (all-reduced)
        if improved:
            best = {"val_acc": val["acc"], "epoch": epoch + 1}
        if main:
            if improved:
                state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                atomic_save({**model_meta, "format_version": FORMAT_VERSION,
                             "state_dict": state, "weights_hash": weights_hash(state),
                             "epoch": epoch + 1,
                             "val_acc": val["acc"], "config": ident.config,
                             "config_hash": ident.config_hash}, best_path)
            # Log first, checkpoint second: a crash between the two leaves an extra
            # log record, which resume drops (MetricsLog keep_through).
            log.log(**record)
            ckpt = {"format_version": FORMAT_VERSION,
                    "modules": modules.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "data": train_iter.state_dict(),
                    "rng": rng_state(), "epoch": epoch + 1, "best": best,
                    "config_hash": ident.config_hash, "config_items": ident.items,
                    "config": ident.config}
            if ctx.enabled:
                ckpt["world_size"], ckpt["rank_rng"] = ctx.world_size, rank_rng
            atomic_save(ckpt, ckpt_path)
            print(f"{log_prefix}epoch {epoch + 1}/{epochs}: train loss "
                  f"{record['train_loss']:.4f} acc {record['train_acc']:.4f} | val loss "
                  f"{val['loss']:.4f} acc {val['acc']:.4f} | {train_time:.1f}s "
                  f"({record['images_per_s']:.0f} img/s)", flush=True)
        barrier()  # model.pt / checkpoint.pt are on disk before any rank reads them
    done = max(end_epoch, start_epoch)
    if done < epochs and main:
        print(f"{log_prefix}stopped after epoch {done}/{epochs} (run.stop_after="
              f"{stop_after}); continue with --resume", flush=True)
    return {"complete": done >= epochs, "epochs_done": done,
            "best_epoch": best["epoch"], "best_val_acc": best["val_acc"],
            "model_path": str(best_path), "checkpoint_path": str(ckpt_path),
            "metrics_path": str(run_dir / "metrics.jsonl")}


# ------------------------------------------------------------ per-step seeds
SEED_MASK = (1 << 62) - 1


def derive_seed(run_seed: int, step: int, stream: int = 0) -> int:
    """The Philox seed of optimizer step ``step`` (0-based, global over epochs)
    of a run seeded ``run_seed``: ``blake2b(run_seed, step, stream) & (2**62 - 1)``.

    A pure function of its arguments (no RNG state), so a resumed run draws the
    noise and masks an uninterrupted one would; ``stream`` separates unrelated
    consumers of the same step (e.g. stage-1 RDM noise vs stage-2 IBM noise).
    Stable across processes, Python versions and machines (unlike ``hash()`` of
    strings)."""
    import struct
    blob = struct.pack("<qqq", int(run_seed), int(step), int(stream))
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little") & SEED_MASK


# ------------------------------------------------------------------ FLOPs
@torch.no_grad()
def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one eval-mode forward of ``model`` on ``x``."""
    from torch.utils.flop_counter import FlopCounterMode
    was = model.training
    model.eval()
    with FlopCounterMode(display=False) as fc:
        model(x)
    model.train(was)
    return int(fc.get_total_flops())


def measure_step_flops(modules: nn.Module, step_fn: Callable[[Any], torch.Tensor],
                       batch: Any) -> int:
    """FLOPs (torch.utils.flop_counter: matmuls and convolutions, forward +
    backward) of one training step ``step_fn(batch) -> loss`` with
    ``loss.backward()``; optimizer updates (elementwise) are not counted.

    Side-effect free: the modules' state (BatchNorm statistics), gradients
    and torch's RNG are restored afterwards, so measuring does not perturb
    an exactly resumable run."""
    from torch.utils.flop_counter import FlopCounterMode
    import copy
    state = copy.deepcopy(modules.state_dict())
    grads = {n: (None if p.grad is None else p.grad.clone())
             for n, p in modules.named_parameters()}
    rng = torch.get_rng_state()
    was_training = modules.training
    modules.train()
    try:
        with FlopCounterMode(display=False) as fc:
            loss = step_fn(batch)
            loss.backward()
        return int(fc.get_total_flops())
    finally:
        modules.load_state_dict(state)
        for n, p in modules.named_parameters():
            p.grad = grads[n]
        torch.set_rng_state(rng)
        modules.train(was_training)
