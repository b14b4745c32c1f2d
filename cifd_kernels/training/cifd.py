# SPDX-License-Identifier: Apache-2.0
"""Stage 2 of CIFD: the student (``cifd distill --method cifd``).

Targets (docs/METHOD.md section 4): the frozen teacher (embedding ``X``,
logits ``V_T``) first, then the N RDMs of the frozen bank (``Xh_n``, ``V_n``),
evaluated in eval mode (rounded latent), so for a fixed input they are fixed:
with unaugmented data (``data.augment: false``) they are computed once from
the cached teacher outputs of the train split and indexed per batch; with
augmentation the teacher and the bank run on every batch.

Student side (:class:`CIFDStudent`): the student's embedding ``W`` goes
through the IBM (``Wh = W + s*u``, rate ``rate_I``); the head sees ``Wh`` in
training, the raw ``W`` at inference (eval mode: the IBM is removed); a
decoder ``U = decoder(Wh)`` (``Linear(D_s, D)``, or Linear-ReLU-Linear) maps
to the teacher's width for the embedding terms. The loss is
:class:`cifd_kernels.CIFDLoss` with KD-dropout (``cifd.p_drop``), KD weights
from the ``kd`` section (tau, KL scaled by tau^2).

Randomness: the IBM noise and the KD-dropout flags of optimizer step ``s``
come from Philox seeds ``derive_seed(train.seed, s, STREAM_IBM / STREAM_DROP)``
where ``s`` is the LR scheduler's step count (restored on resume): a run
resumed after any epoch ends bit-identical to an uninterrupted one. Only the
student (``model.pt``) is kept for inference; ``checkpoint.pt`` also holds the
IBM and the decoder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .config import Config, config_hash, hashed_items, to_dict
from .distributed import barrier, context, seed_per_rank, single_process, wrap_ddp
from .engine import (CheckpointMismatchError, RunIdentity, build_optimizer, build_scheduler,
                     derive_seed, fit, forward_flops, measure_step_flops, seed_everything,
                     select_device, set_threads)
from .teacher import (check_teacher_data, default_teacher_checkpoint, finish_run, load_data,
                      load_model_file, make_iterator, model_meta, new_model, prepare_model,
                      student_run_dir, teacher_outputs)

STREAM_IBM, STREAM_DROP = 2, 3
CIFD_SECTIONS = ("data", "model", "train", "kd", "cifd", "rdm")


def make_decoder(d_in: int, d_out: int, layers: int) -> nn.Module:
    """``U = decoder(Wh)``: ``Linear(d_in, d_out)`` (1 layer) or
    ``Linear(d_in, d_out) -> ReLU -> Linear(d_out, d_out)`` (2 layers)."""
    if layers == 1:
        return nn.Linear(d_in, d_out)
    if layers == 2:
        return nn.Sequential(nn.Linear(d_in, d_out), nn.ReLU(inplace=True),
                             nn.Linear(d_out, d_out))
    raise ValueError(f"cifd.decoder_layers must be 1 or 2, got {layers}")


class CIFDStudent(nn.Module):
    """A student (``features``/``head``), its IBM and the embedding decoder.

    ``forward(x, seed, offset)`` -> logits ``[B, K]``: in training
    ``head(IBM(W))`` (Philox ``seed``, element i of W [B, D_s] row-major at
    counter ``offset + i``), in eval mode ``head(W)`` exactly, i.e.
    ``student(x)``: the IBM is removed at inference.
    ``train_outputs(x, seed, offset)`` -> ``(logits, U [B, D_teacher], rate_I [B]
    nats)``, also ``forward(..., all_outputs=True)`` (the way in through DDP).

    The IBM's ``quantiles`` are frozen (``requires_grad`` False): only
    CompressAI's entropy coding reads them and the IBM never codes; frozen,
    every trainable parameter gets a gradient each step, as DDP requires.
    """

    def __init__(self, student: nn.Module, teacher_dim: int, *, rho: float = 0.0,
                 s: float = 1.0, decoder_layers: int = 1):
        super().__init__()
        from cifd_kernels import IBM
        self.student = student
        self.ibm = IBM(student.embed_dim, rho=rho, s=s)
        self.decoder = make_decoder(student.embed_dim, teacher_dim, decoder_layers)
        self.ibm.quantiles.requires_grad_(False)

    def train_outputs(self, x: torch.Tensor, seed: Optional[int] = None, offset: int = 0):
        w = self.student.features(x)
        w_hat, rate = self.ibm(w, seed=seed, offset=offset)
        return self.student.head(w_hat), self.decoder(w_hat), rate

    def forward(self, x: torch.Tensor, seed: Optional[int] = None, offset: int = 0,
                all_outputs: bool = False):
        if all_outputs:
            return self.train_outputs(x, seed, offset)
        if not self.training:
            return self.student(x)
        return self.train_outputs(x, seed, offset)[0]

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Student and decoder with ``weight_decay``; the IBM's density without
        (it is a probability model, not a feature map); its ``quantiles`` not
        at all (only CompressAI's entropy coding reads them, and the IBM never
        codes)."""
        ibm_params = [p for n, p in self.ibm.named_parameters() if n != "quantiles"]
        return [{"params": list(self.student.parameters()) + list(self.decoder.parameters()),
                 "weight_decay": weight_decay},
                {"params": ibm_params, "weight_decay": 0.0}]


def cifd_run_dir(cfg: Config) -> Path:
    return student_run_dir(cfg, "cifd")


def distill_cifd(cfg: Config, *, resume: bool = False, overwrite: bool = False,
                 run_dir: Optional[Path] = None) -> dict:
    """Train the student ``cfg.model.arch`` by CIFD from the teacher and the RDM
    bank (``cifd.bank``, default ``<out_dir>/<name>/rdms/bank.pt``); returns the
    run summary (as every student run, plus the loss settings)."""
    from cifd_kernels import CIFDLoss
    from .rdms import bank_outputs, default_bank_path, load_bank
    set_threads(cfg.run.threads)
    device = select_device(cfg.run.device)
    ds = load_data(cfg)
    teacher, tmeta = load_model_file(default_teacher_checkpoint(cfg), device)
    check_teacher_data(tmeta, ds)
    teacher = prepare_model(cfg, teacher, device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    bank, bmeta = load_bank(default_bank_path(cfg), device)
    if bmeta["teacher_weights"] != tmeta["weights_hash"]:
        raise CheckpointMismatchError(
            f"the RDM bank {bmeta['path']} was trained on another teacher (weights "
            f"{bmeta['teacher_weights']}, from {bmeta.get('teacher_path', '?')}; this teacher "
            f"{tmeta['path']} has {tmeta['weights_hash']}): run `cifd train-rdms` with this "
            f"teacher, or set cifd.bank=PATH to its bank")
    n_rdm = bank.n
    extra = {"method": "cifd", "teacher_weights": tmeta["weights_hash"],
             "bank_weights": bmeta["weights_hash"]}

    out = teacher_outputs(teacher, tmeta["arch"], ds, "train",
                          Path(tmeta["path"]).parent / "cache",
                          batch_size=cfg.data.eval_batch_size,
                          num_workers=cfg.data.num_workers, device=device,
                          channels_last=cfg.train.channels_last)
    emb_sq_norm = out.embeddings.double().pow(2).sum(1).mean().item()
    targets = None  # (embs [M, N_train, D], logits [M, N_train, K]) when cacheable
    if not cfg.data.augment:
        emb, logits = out.embeddings.to(device), out.logits.to(device)
        xh, vr = bank_outputs(bank, emb)
        targets = (torch.cat([emb.unsqueeze(0), xh]), torch.cat([logits.unsqueeze(0), vr]))
    c = cfg.cifd
    # CIFDLoss's w_emb is in the paper's units (mean over the D features; it divides
    # by D): (w_emb / D) * dist (docs/METHOD.md section 4). emb_normalize divides the
    # summed distortion by E||X||^2 instead: w_emb * D / E||X||^2 in those units.
    w_emb = c.w_emb * bank.D / emb_sq_norm if c.emb_normalize else c.w_emb

    seed_everything(cfg.train.seed)
    model = new_model(cfg, ds, device)
    wrapper = CIFDStudent(model, bank.D, rho=c.ibm_rho, s=c.ibm_s,
                          decoder_layers=c.decoder_layers).to(device)
    net = wrap_ddp(wrapper, device)
    seed_per_rank(cfg.train.seed)
    train_iter = make_iterator(cfg, ds, "train", device, train=True, seed=cfg.train.seed)
    val_iter = make_iterator(cfg, ds, "val", device, train=False)
    opt = build_optimizer(wrapper.param_groups(cfg.train.weight_decay), cfg.train)
    sched = build_scheduler(opt, cfg.train, len(train_iter))
    ident = RunIdentity(config_hash(cfg, CIFD_SECTIONS, extra),
                        hashed_items(cfg, CIFD_SECTIONS), to_dict(cfg))
    loss_fn = CIFDLoss(lam=[1.0] + [c.lam_rdm] * n_rdm, tau=cfg.kd.tau, p_drop=c.p_drop,
                       lam_ce=cfg.kd.lam_ce, lam_kl=cfg.kd.lam_kl, w_emb=w_emb,
                       lam_I=c.lam_I, dist=cfg.rdm.distortion)
    run_seed = cfg.train.seed

    def targets_of(batch):
        if targets is not None:
            pos = batch.pos.to(device)
            return targets[0][:, pos], targets[1][:, pos]
        with torch.no_grad():
            x = teacher.features(batch.x)
            v = teacher.head(x)
            xh, vr = bank.frozen_targets(x)
        return torch.cat([x.unsqueeze(0), xh]), torch.cat([v.unsqueeze(0), vr])

    def loss_of(net, batch, step: int):
        t_embs, t_logits = targets_of(batch)
        # IBM noise: this rank's rows of the global batch at their single-process
        # counters; KD-dropout flags: one draw per step, alike on every rank.
        logits, u, rate = net(batch.x, derive_seed(run_seed, step, STREAM_IBM),
                              batch.row0 * model.embed_dim, all_outputs=True)
        loss, _ = loss_fn(logits, t_logits, batch.y, u, t_embs, rate,
                          seed=derive_seed(run_seed, step, STREAM_DROP))
        return loss, logits

    def step(batch):
        # The scheduler's count is the global optimizer step: restored on resume.
        return loss_of(net, batch, sched.last_epoch)

    run_dir = Path(run_dir) if run_dir is not None else cifd_run_dir(cfg)
    print(f"distill --method cifd: {cfg.model.arch} on {ds.name}, {cfg.train.epochs} epochs, "
          f"teacher {tmeta['path']}, {n_rdm} RDMs (R = {list(bank.R)}) "
          f"{'(cached targets)' if targets is not None else '(targets per batch)'}, "
          f"w_emb {w_emb:.4g} -> {run_dir}",
          flush=True)
    summary = fit(run_dir=run_dir, modules=wrapper, model=model, step_fn=step,
                  train_iter=train_iter, val_iter=val_iter, optimizer=opt, scheduler=sched,
                  epochs=cfg.train.epochs, ident=ident,
                  model_meta=model_meta(cfg.model.arch, ds, cfg.model.embed_dim, "student"),
                  resume=resume, overwrite=overwrite, progress=cfg.run.progress,
                  stop_after=cfg.run.stop_after, log_prefix="[cifd] ")
    if not summary["complete"]:
        return summary
    with single_process():  # one global batch through the plain modules, on every rank
        first = next(iter(make_iterator(cfg, ds, "train", device, train=True,
                                        seed=run_seed + 1)))
        flops = measure_step_flops(wrapper, lambda b: loss_of(wrapper, b, 0)[0], first)
    one_off = 0
    if targets is not None:  # teacher + frozen bank over the train split, once
        one_off = forward_flops(teacher, first.x) * len(ds.train) // first.x.shape[0]
        one_off += forward_flops(bank, targets[0][0, :first.x.shape[0]]) * len(ds.train) \
            // first.x.shape[0]
    train_flops = flops * cfg.train.epochs * len(train_iter) + one_off
    extra = {"method": "cifd", "n_rdms": n_rdm, "R": list(bank.R), "bank": bmeta["path"],
             "flops_per_step": flops, "steps": cfg.train.epochs * len(train_iter),
             "one_off_flops": one_off, "train_flops": train_flops,
             "w_emb_effective": w_emb / bank.D, "teacher_emb_sq_norm": emb_sq_norm}
    rdm_results = Path(bmeta["path"]).parent / "results.json"
    if rdm_results.is_file():  # stage 1's cost belongs to the method
        import json
        try:
            r = json.loads(rdm_results.read_text())
            extra.update(rdm_train_time_s=float(r["total_train_time_s"]),
                         rdm_train_flops=int(r["train_flops"]),
                         method_train_flops=train_flops + int(r["train_flops"]))
        except (OSError, ValueError, KeyError, TypeError) as e:  # optional: only costs
            print(f"[cifd] warning: {rdm_results} is not a readable RDM results file "
                  f"({type(e).__name__}: {e}); stage 1's cost is left out of this run's "
                  f"summary (`cifd train-rdms --overwrite` rewrites it)", flush=True)
    summary = finish_run(run_dir, cfg, ds, summary, device, extra=extra)
    if "rdm_train_time_s" in summary:
        summary["method_train_time_s"] = summary["total_train_time_s"] + \
            summary["rdm_train_time_s"]
        from .engine import atomic_write_text
        import json
        if context().is_main:
            atomic_write_text(json.dumps(summary, indent=2) + "\n", run_dir / "summary.json")
        barrier()
    print(f"[cifd] {cfg.model.arch}: best val acc {summary['val_acc']:.4f} (epoch "
          f"{summary['best_epoch']}), test acc {summary['test_acc']:.4f}", flush=True)
    return summary
