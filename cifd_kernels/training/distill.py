# SPDX-License-Identifier: Apache-2.0
"""Student training: from scratch, by KD, by TAKD and by CIFD.

``scratch``: cross-entropy only (the baseline every method is held against).
``kd``: Hinton KD against the frozen teacher, :func:`kd_loss`.
``takd``: KD down the teacher-assistant chain ``takd.tas`` (default cnn8 ->
cnn6 -> cnn4): each TA by KD from the previous network (the teacher first),
then the student by KD from the last TA (:func:`distill_takd`).
``cifd``: the student with IBM and decoder against the teacher and the frozen
RDM bank (:mod:`.cifd`; train the bank first with ``train-rdms``).

Every summary carries ``train_flops`` (FLOPs of one measured training step,
forward + backward, times the number of steps, plus one-off passes such as
the teacher over the train split for the cache) and ``total_train_time_s``
(training passes only); TAKD and CIFD also carry ``method_train_flops`` /
``method_train_time_s`` summed over their stages (TAs; RDMs).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .config import Config, config_hash, hashed_items, to_dict
from .distributed import seed_per_rank, single_process, wrap_ddp
from .engine import (RunIdentity, build_optimizer, build_scheduler, fit, forward_flops,
                     measure_step_flops, seed_everything, select_device, set_threads)
from .teacher import (check_teacher_data, default_teacher_checkpoint, finish_run, load_data,
                      load_model_file, make_iterator, model_meta, new_model, prepare_model,
                      student_run_dir, teacher_outputs)

METHODS = ("scratch", "kd", "takd", "cifd")


class NotWiredError(NotImplementedError):
    """A command or method whose modules have not landed in the recipes yet."""


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor, *,
            tau: float, lam_ce: float = 1.0, lam_kl: float = 1.0) -> torch.Tensor:
    """Hinton KD, student first: ``lam_ce * CE(y, V_S) + lam_kl * tau^2 *
    KL(p_T || p_S)`` with ``p = softmax(V / tau)``, KL in nats, batch mean.

    ``student_logits``, ``teacher_logits``: [B, K] (fp32 math inside);
    ``y``: int64 [B]. The tau^2 factor keeps the KL gradient's scale independent
    of tau (Hinton's convention, the project's choice for CIFD too). This is the
    recipe's own small loss for the KD and TAKD baselines; CIFD's student loss
    (RDM targets, embedding distortion, KD-dropout, IBM rate) is
    ``cifd_kernels.CIFDLoss``.
    """
    s = student_logits.float()
    log_p_s = F.log_softmax(s / tau, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / tau, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()
    return lam_ce * F.cross_entropy(s, y) + lam_kl * tau * tau * kl


def distill(cfg: Config, method: str, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Train the student ``cfg.model.arch`` by ``method``; returns the run summary."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    if method == "cifd":
        from .cifd import distill_cifd
        return distill_cifd(cfg, resume=resume, overwrite=overwrite)
    if method == "takd":
        return distill_takd(cfg, resume=resume, overwrite=overwrite)
    return train_student(cfg, method, resume=resume, overwrite=overwrite)


def ta_config(cfg: Config, arch: str, teacher_path: str | Path) -> Config:
    """The KD run of teacher assistant ``arch`` taught by ``teacher_path``."""
    c = copy.deepcopy(cfg)
    c.model.arch, c.model.embed_dim = arch, 0
    c.teacher.checkpoint = str(teacher_path)
    if cfg.takd.ta_epochs:
        c.train.epochs = cfg.takd.ta_epochs
    return c


def distill_takd(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> dict:
    """TAKD: each TA of ``takd.tas`` by KD from the previous network (the
    teacher first), then the student by KD from the last TA. Run directories
    ``takd_ta<i>_<arch>`` and ``takd_<student arch>``; the student's summary
    gains ``stages`` (the TAs') and the method totals."""
    prev = default_teacher_checkpoint(cfg)
    stages = []
    for i, arch in enumerate(cfg.takd.tas):
        c = ta_config(cfg, arch, prev)
        s = train_student(c, "kd", resume=resume, overwrite=overwrite, label=f"takd:ta{i + 1}",
                          run_dir=student_run_dir(c, f"takd_ta{i + 1}", arch))
        if not s["complete"]:
            return s
        stages.append(s)
        prev = s["model_path"]
    c = copy.deepcopy(cfg)
    c.teacher.checkpoint = str(prev)
    s = train_student(c, "kd", resume=resume, overwrite=overwrite, label="takd",
                      run_dir=student_run_dir(cfg, "takd"), method_name="takd")
    if not s["complete"]:
        return s
    s["stages"] = [{k: st[k] for k in ("arch", "val_acc", "test_acc", "total_train_time_s",
                                       "train_flops", "model_path")} for st in stages]
    s["method_train_time_s"] = s["total_train_time_s"] + sum(
        st["total_train_time_s"] for st in stages)
    s["method_train_flops"] = s["train_flops"] + sum(st["train_flops"] for st in stages)
    from .distributed import barrier, context
    from .engine import atomic_write_text
    import json
    if context().is_main:
        atomic_write_text(json.dumps(s, indent=2) + "\n",
                          Path(s["model_path"]).parent / "summary.json")
    barrier()
    return s


def train_student(cfg: Config, method: str, *, resume: bool = False, overwrite: bool = False,
                  run_dir: Optional[Path] = None, label: Optional[str] = None,
                  method_name: Optional[str] = None) -> dict:
    """A student (``scratch``: CE; ``kd``: KD from ``teacher.checkpoint``) in
    ``run_dir`` (default :func:`student_run_dir`)."""
    if method not in ("scratch", "kd"):
        raise ValueError(f"train_student: method must be scratch or kd, got {method!r}")
    label = label or method
    set_threads(cfg.run.threads)
    device = select_device(cfg.run.device)
    ds = load_data(cfg)

    extra = {"method": method}
    teacher = None
    cached_logits = None
    if method == "kd":
        teacher, tmeta = load_model_file(default_teacher_checkpoint(cfg), device)
        check_teacher_data(tmeta, ds)
        teacher = prepare_model(cfg, teacher, device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        extra["teacher_weights"] = tmeta["weights_hash"]
        if not cfg.data.augment:
            # Unaugmented inputs: the teacher's logits are a fixed function of
            # the image, so read them from the cache instead of re-running it.
            out = teacher_outputs(teacher, tmeta["arch"], ds, "train",
                                  Path(tmeta["path"]).parent / "cache",
                                  batch_size=cfg.data.eval_batch_size,
                                  num_workers=cfg.data.num_workers, device=device,
                                  channels_last=cfg.train.channels_last)
            cached_logits = out.logits.to(device)
    sections = ("data", "model", "train") + (("kd",) if method == "kd" else ())

    seed_everything(cfg.train.seed)
    model = new_model(cfg, ds, device)
    net = wrap_ddp(model, device)
    seed_per_rank(cfg.train.seed)
    train_iter = make_iterator(cfg, ds, "train", device, train=True, seed=cfg.train.seed)
    val_iter = make_iterator(cfg, ds, "val", device, train=False)
    opt = build_optimizer(model.parameters(), cfg.train)
    sched = build_scheduler(opt, cfg.train, len(train_iter))
    ident = RunIdentity(config_hash(cfg, sections, extra), hashed_items(cfg, sections),
                        to_dict(cfg))
    kd = cfg.kd
    ls = cfg.train.label_smoothing

    def step_of(net, batch):
        logits = net(batch.x)
        if method == "scratch":
            return F.cross_entropy(logits, batch.y, label_smoothing=ls), logits
        if cached_logits is not None:
            t_logits = cached_logits[batch.pos.to(device)]
        else:
            with torch.no_grad():
                t_logits = teacher(batch.x)
        return kd_loss(logits, t_logits, batch.y, tau=kd.tau, lam_ce=kd.lam_ce,
                       lam_kl=kd.lam_kl), logits

    def step(batch):
        return step_of(net, batch)

    run_dir = Path(run_dir) if run_dir is not None else student_run_dir(cfg, method)
    print(f"distill --method {label}: {cfg.model.arch} on {ds.name}, {cfg.train.epochs} epochs"
          + (f", teacher {default_teacher_checkpoint(cfg)}"
             f"{' (cached logits)' if cached_logits is not None else ''}" if teacher else "")
          + f" -> {run_dir}", flush=True)
    summary = fit(run_dir=run_dir, modules=model, model=model, step_fn=step,
                  train_iter=train_iter, val_iter=val_iter, optimizer=opt, scheduler=sched,
                  epochs=cfg.train.epochs, ident=ident,
                  model_meta=model_meta(cfg.model.arch, ds, cfg.model.embed_dim, "student"),
                  resume=resume, overwrite=overwrite, progress=cfg.run.progress,
                  stop_after=cfg.run.stop_after,
                  log_prefix=f"[{label}] ")
    if not summary["complete"]:
        return summary
    with single_process():  # one global batch through the plain model, on every rank
        first = next(iter(make_iterator(cfg, ds, "train", device, train=True,
                                        seed=cfg.train.seed + 1)))
        flops = measure_step_flops(model, lambda b: step_of(model, b)[0], first)
    steps = cfg.train.epochs * len(train_iter)
    one_off = 0
    if cached_logits is not None:  # the teacher over the train split, once
        one_off = forward_flops(teacher, first.x) * len(ds.train) // first.x.shape[0]
    summary = finish_run(run_dir, cfg, ds, summary, device, extra={
        "method": method_name or method, "flops_per_step": flops, "steps": steps,
        "one_off_flops": one_off, "train_flops": flops * steps + one_off})
    print(f"[{label}] {cfg.model.arch}: best val acc {summary['val_acc']:.4f} (epoch "
          f"{summary['best_epoch']}), test acc {summary['test_acc']:.4f}", flush=True)
    return summary
