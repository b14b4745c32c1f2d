# SPDX-License-Identifier: Apache-2.0
"""Teacher training, model files, and the cache of teacher outputs.

Stage 1 of CIFD trains RDMs on the frozen teacher's embeddings ``X`` and
logits ``V_T``; computing them once and caching them makes RDM training cheap.
:func:`teacher_outputs` stores them with a key made of the hash of the
teacher's weights, the data split's fingerprint and the transform, and reuses
the file only when all three match.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data as data_mod
from .config import Config, config_hash, hashed_items, to_dict
from .engine import (FORMAT_VERSION, MetricsLog, RunFileError, RunIdentity, atomic_save,
                     atomic_write_text, build_optimizer, build_scheduler, evaluate, fit,
                     load_file, read_metrics, seed_everything, select_device, set_threads,
                     weights_hash)
from .distributed import seed_per_rank, wrap_ddp
from .models import build_model

TEACHER_SECTIONS = ("data", "model", "train")


def run_root(cfg: Config) -> Path:
    return Path(cfg.run.out_dir) / cfg.run.name


def student_run_dir(cfg: Config, method: str, arch: Optional[str] = None) -> Path:
    """``<out_dir>/<name>/<method>_<arch>``, with ``_s<seed>`` for train.seed != 0."""
    sfx = f"_s{cfg.train.seed}" if cfg.train.seed else ""
    return run_root(cfg) / f"{method}_{arch or cfg.model.arch}{sfx}"


def teacher_run_dir(cfg: Config) -> Path:
    return run_root(cfg) / "teacher"


def default_teacher_checkpoint(cfg: Config) -> Path:
    return Path(cfg.teacher.checkpoint) if cfg.teacher.checkpoint \
        else teacher_run_dir(cfg) / "model.pt"


def load_data(cfg: Config) -> data_mod.Dataset:
    """The configured dataset; ``data.train_size`` > 0 keeps a fixed subset
    (seed ``data.split_seed``, file order kept) of that many training images."""
    ds = data_mod.load_dataset(cfg.data.name, cfg.data.dir or None,
                               val_size=cfg.data.val_size, split_seed=cfg.data.split_seed,
                               image_size=cfg.data.image_size)
    n = cfg.data.train_size
    if 0 < n < len(ds.train):
        g = torch.Generator().manual_seed(cfg.data.split_seed + 1)
        keep = torch.randperm(len(ds.train), generator=g)[:n].sort().values
        ds.train = ds.train.subset(keep)
    return ds


def make_iterator(cfg: Config, ds: data_mod.Dataset, split: str, device: torch.device, *,
                  train: bool, seed: int = 0, rank: Optional[int] = None,
                  world_size: Optional[int] = None) -> data_mod.BatchIterator:
    """Training batches (shuffled, augmented if data.augment; this rank's slice
    of each global batch of data.batch_size) or evaluation batches (in order,
    unaugmented; this rank's unpadded shard, whose sums evaluate() all-reduces)
    of ``split``. ``rank``/``world_size`` default to the process's
    (:mod:`.distributed`)."""
    from .config import ConfigError
    from .distributed import context
    ctx = context()
    rank = ctx.rank if rank is None else rank
    world_size = ctx.world_size if world_size is None else world_size
    if train and cfg.data.batch_size % world_size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is the global batch and "
                          f"must be a multiple of the number of processes ({world_size})")
    return data_mod.make_batches(
        ds.split(split), cfg.data.batch_size if train else cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        mean=ds.mean, std=ds.std, shuffle=train, augment=train and cfg.data.augment,
        crop_padding=cfg.data.crop_padding, hflip=cfg.data.hflip, seed=seed, rank=rank,
        world_size=world_size, device=device, channels_last=cfg.train.channels_last,
        shard="batch" if train else "sample", pad=train)


def model_meta(arch: str, ds: data_mod.Dataset, embed_dim: int, role: str) -> dict:
    return {"arch": arch, "num_classes": ds.num_classes, "in_channels": ds.in_channels,
            "image_size": ds.image_size, "embed_dim": embed_dim, "role": role,
            "dataset": ds.name}


def load_model_file(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model saved in a ``model.pt`` (or a run directory holding
    one); returns (model in eval mode, the file's contents less weights)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found (train it first, e.g. "
                                f"`cifd train-teacher`, or set teacher.checkpoint=PATH)")
    fix = ("Pass the model.pt of a finished run (or its run directory), not a "
           "checkpoint.pt; a damaged one is made again by training with --overwrite")
    blob = load_file(path, "cifd model file", fix, ("arch", "state_dict", "num_classes",
                                                   "in_channels", "image_size",
                                                   "weights_hash", "config"))
    with data_mod.guard_read(path, "cifd model file", fix, RunFileError):
        model = build_model(blob["arch"], blob["num_classes"], in_channels=blob["in_channels"],
                            image_size=blob["image_size"], embed_dim=blob.get("embed_dim", 0))
        model.load_state_dict(blob["state_dict"])
    model.to(device).eval()
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    meta["path"] = str(path)
    return model, meta


def check_teacher_data(tmeta: dict, ds: data_mod.Dataset) -> None:
    """Refuse a teacher model file trained on another dataset (or class count)."""
    from .engine import CheckpointMismatchError
    if (tmeta.get("dataset"), tmeta["num_classes"]) != (ds.name, ds.num_classes):
        raise CheckpointMismatchError(
            f"teacher {tmeta['path']} was trained on {tmeta.get('dataset')} "
            f"({tmeta['num_classes']} classes), not {ds.name} ({ds.num_classes} classes): "
            f"set teacher.checkpoint=PATH (--teacher) to a teacher of this dataset")


def prepare_model(cfg: Config, model: nn.Module, device: torch.device) -> nn.Module:
    """Move to ``device``, NHWC when train.channels_last."""
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def new_model(cfg: Config, ds: data_mod.Dataset, device: torch.device) -> nn.Module:
    """A freshly initialised ``cfg.model`` for ``ds``, prepared for ``device``;
    under DDP its BatchNorm layers normalise over the global batch."""
    from .distributed import convert_sync_batchnorm
    model = build_model(cfg.model.arch, ds.num_classes, in_channels=ds.in_channels,
                        image_size=ds.image_size, embed_dim=cfg.model.embed_dim)
    return convert_sync_batchnorm(prepare_model(cfg, model, device), device)


def finish_run(run_dir: Path, cfg: Config, ds: data_mod.Dataset, summary: dict,
               device: torch.device, extra: Optional[dict] = None) -> dict:
    """Evaluate the selected (best-val) model on test; log and write summary.json
    (rank 0; every rank returns the summary)."""
    from .distributed import barrier, context
    model, meta = load_model_file(run_dir / "model.pt", device)
    model = prepare_model(cfg, model, device)
    test = evaluate(model, make_iterator(cfg, ds, "test", device, train=False),
                    progress=cfg.run.progress and context().is_main, desc="test")
    summary = {**summary, "arch": meta["arch"], "val_acc": meta["val_acc"],
               "test_acc": test["acc"], "test_loss": test["loss"],
               "weights_hash": meta["weights_hash"], **(extra or {})}
    if context().enabled:
        summary["processes"] = context().world_size
    records = read_metrics(run_dir / "metrics.jsonl")
    epochs = [r for r in records if "epoch_time_s" in r]
    if epochs:
        summary["mean_epoch_time_s"] = sum(r["epoch_time_s"] for r in epochs) / len(epochs)
        summary["total_train_time_s"] = sum(r["epoch_time_s"] for r in epochs)
        summary["mean_epoch_cpu_s"] = sum(r["epoch_cpu_s"] for r in epochs) / len(epochs)
        summary["threads"] = epochs[-1]["threads"]
    # A finished run resumed again re-tests: keep one "test" record.
    kept = [json.dumps(r) + "\n" for r in records if r.get("event") != "test"]
    if context().is_main:
        atomic_write_text("".join(kept), run_dir / "metrics.jsonl")
        MetricsLog(run_dir / "metrics.jsonl", keep_through=cfg.train.epochs).log(
            event="test", epoch=cfg.train.epochs, best_epoch=summary["best_epoch"],
            val_acc=meta["val_acc"], test_acc=test["acc"], test_loss=test["loss"])
        atomic_write_text(json.dumps(summary, indent=2) + "\n", run_dir / "summary.json")
    barrier()
    return summary


def train_teacher(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Train ``cfg.model.arch`` with cross-entropy on ``cfg.data``; returns the
    run summary (best validation epoch, its validation and test accuracy)."""
    set_threads(cfg.run.threads)
    device = select_device(cfg.run.device)
    ds = load_data(cfg)
    seed_everything(cfg.train.seed)
    model = new_model(cfg, ds, device)
    net = wrap_ddp(model, device)
    seed_per_rank(cfg.train.seed)
    train_iter = make_iterator(cfg, ds, "train", device, train=True, seed=cfg.train.seed)
    val_iter = make_iterator(cfg, ds, "val", device, train=False)
    opt = build_optimizer(model.parameters(), cfg.train)
    sched = build_scheduler(opt, cfg.train, len(train_iter))
    ident = RunIdentity(config_hash(cfg, TEACHER_SECTIONS), hashed_items(cfg, TEACHER_SECTIONS),
                        to_dict(cfg))
    ls = cfg.train.label_smoothing

    def step(batch):
        logits = net(batch.x)
        return F.cross_entropy(logits, batch.y, label_smoothing=ls), logits

    run_dir = teacher_run_dir(cfg)
    print(f"train-teacher: {cfg.model.arch} on {ds.name} ({len(ds.train)} train / "
          f"{len(ds.val)} val / {len(ds.test)} test), {cfg.train.epochs} epochs, "
          f"device {device}, {torch.get_num_threads()} threads -> {run_dir}", flush=True)
    summary = fit(run_dir=run_dir, modules=model, model=model, step_fn=step,
                  train_iter=train_iter, val_iter=val_iter, optimizer=opt, scheduler=sched,
                  epochs=cfg.train.epochs, ident=ident,
                  model_meta=model_meta(cfg.model.arch, ds, cfg.model.embed_dim, "teacher"),
                  resume=resume, overwrite=overwrite, progress=cfg.run.progress,
                  stop_after=cfg.run.stop_after,
                  log_prefix="[teacher] ")
    if not summary["complete"]:
        return summary
    summary = finish_run(run_dir, cfg, ds, summary, device)
    print(f"[teacher] best val acc {summary['val_acc']:.4f} (epoch {summary['best_epoch']}), "
          f"test acc {summary['test_acc']:.4f}; model {summary['model_path']}", flush=True)
    return summary


# -------------------------------------------------------------- output cache
@dataclass
class TeacherOutputs:
    """Frozen-teacher outputs on one split, in the split's order.

    ``embeddings``: float32 [N, D] (``features(x)``, eval mode, unaugmented);
    ``logits``: float32 [N, K]; ``labels``: int64 [N]; ``key``: what they were
    computed from; ``from_cache``: whether they were read from disk.
    """
    embeddings: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    key: dict
    from_cache: bool = False


def cache_key(model: nn.Module, arch: str, split: data_mod.Split, mean, std) -> dict:
    return {"weights": weights_hash(model), "arch": arch, "data": split.fingerprint(),
            "transform": {"normalize_mean": list(mean), "normalize_std": list(std),
                          "augment": False}, "version": 1}


@torch.inference_mode()
def compute_teacher_outputs(model: nn.Module, batches) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    embs, logits = [], []
    for b in batches:
        e = model.features(b.x)
        embs.append(e.float().cpu())
        logits.append(model.head(e).float().cpu())
    return torch.cat(embs), torch.cat(logits)


def teacher_outputs(model: nn.Module, arch: str, ds: data_mod.Dataset, split: str,
                    cache_dir: str | Path, *, batch_size: int = 1000,
                    device: torch.device | str = "cpu", channels_last: bool = False,
                    refresh: bool = False, num_workers: int = 0) -> TeacherOutputs:
    """The teacher's embeddings and logits on ``split`` of ``ds``, from
    ``cache_dir/teacher_outputs_<split>.pt`` when its key (weights hash,
    data fingerprint, transform) matches, else computed and cached; a damaged
    cache file raises :class:`RunFileError` (``refresh=True`` recomputes it).
    Under DDP rank 0 computes and writes the cache while the others wait, then
    read it."""
    from .distributed import context, on_main
    if context().enabled:
        def write_cache():  # a damaged cache raises on every rank, not on rank 0 alone
            _teacher_outputs(model, arch, ds, split, cache_dir, batch_size=batch_size,
                             device=device, channels_last=channels_last, refresh=refresh,
                             num_workers=num_workers)
        on_main(write_cache)
        return _teacher_outputs(model, arch, ds, split, cache_dir, batch_size=batch_size,
                                device=device, channels_last=channels_last, refresh=False,
                                num_workers=num_workers)
    return _teacher_outputs(model, arch, ds, split, cache_dir, batch_size=batch_size,
                            device=device, channels_last=channels_last, refresh=refresh,
                            num_workers=num_workers)


def _teacher_outputs(model: nn.Module, arch: str, ds: data_mod.Dataset, split: str,
                     cache_dir: str | Path, *, batch_size: int, device, channels_last: bool,
                     refresh: bool, num_workers: int = 0) -> TeacherOutputs:
    sp = ds.split(split)
    key = cache_key(model, arch, sp, ds.mean, ds.std)
    path = Path(cache_dir) / f"teacher_outputs_{split}.pt"
    if path.exists() and not refresh:
        # A damaged cache is an error, not a silent recompute: it may say the disk is failing.
        blob = load_file(path, "teacher-output cache",
                         "Delete it (it is recomputed), or run `cifd cache-teacher --refresh`",
                         ("key", "embeddings", "logits", "labels"))
        if blob["key"] == key:  # else stale: other weights, data or transform
            return TeacherOutputs(blob["embeddings"], blob["logits"], blob["labels"], key,
                                  from_cache=True)
    it = data_mod.make_batches(sp, batch_size, mean=ds.mean, std=ds.std, device=device,
                               channels_last=channels_last, num_workers=num_workers)
    emb, logits = compute_teacher_outputs(model, it)
    atomic_save({"format_version": FORMAT_VERSION, "key": key, "embeddings": emb,
                 "logits": logits, "labels": sp.labels.clone()}, path)
    return TeacherOutputs(emb, logits, sp.labels.clone(), key, from_cache=False)
