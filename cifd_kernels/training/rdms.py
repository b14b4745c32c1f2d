# SPDX-License-Identifier: Apache-2.0
"""Stage 1 of CIFD: train the bank of Rate-Distortion Modules (``cifd train-rdms``).

All ``len(rdm.rates)`` RDMs train at once as one :class:`cifd_kernels.RDMBank`
on the frozen teacher's cached embeddings ``X`` and logits ``V_T``
(:func:`.teacher.teacher_outputs`), with the stage-1 loss of docs/METHOD.md
section 2 (Adam, cosine learning rate) plus the entropy model's auxiliary
quantile loss (its own Adam group, constant ``rdm.aux_lr``), which places the
channel medians that eval-mode rounding uses. The training noise of step ``s``
comes from Philox seed ``derive_seed(rdm.seed, s, STREAM_RDM)``, so a resumed
run is bit-identical to an uninterrupted one.

The run directory ``<out_dir>/<name>/rdms/`` holds::

    config.yaml checkpoint.pt metrics.jsonl   as every run (engine)
    bank.pt        the trained bank (frozen use: RDMBank in eval mode) and its
                   hyperparameters, the teacher's weights hash it belongs to
    results.json   per RDM: R, distortion, rate (bits), accuracy on val and
                   test, all in eval (frozen, rounded) mode
    rd_curve.png   the rate-distortion curve (the paper's Figure 5)

No model selection happens here: the bank after the last epoch is the bank
(validation numbers are logged per epoch, test numbers reported once).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .config import Config, config_hash, hashed_items, to_dict
from .engine import (FORMAT_VERSION, RESUME_FIX, LRSchedule, MetricsLog, RunFileError,
                     RunIdentity, atomic_save, atomic_write_text, derive_seed, fused_kwargs,
                     load_checkpoint, load_file, rng_state, select_device, set_rng_state,
                     set_threads, weights_hash)
from .data import guard_read
from .teacher import (check_teacher_data, default_teacher_checkpoint, load_data,
                      load_model_file, run_root, teacher_outputs)

STREAM_RDM = 1
RDM_SECTIONS = ("data", "rdm")


def rdm_run_dir(cfg: Config) -> Path:
    return run_root(cfg) / "rdms"


def default_bank_path(cfg: Config) -> Path:
    return Path(cfg.cifd.bank) if cfg.cifd.bank else rdm_run_dir(cfg) / "bank.pt"


def build_bank(cfg: Config, D: int, K: int):
    """A fresh :class:`cifd_kernels.RDMBank` for teacher width ``D``, ``K`` classes."""
    from cifd_kernels import RDMBank
    r = cfg.rdm
    if not r.rates:
        raise ValueError("rdm.rates is empty: give one R per RDM (e.g. rdm.rates=[1,0.3,0.1])")
    H = r.hidden or D
    L = r.latent or H
    return RDMBank(len(r.rates), D, H, L, K, R=list(r.rates), dist=r.distortion,
                   lam_ce=r.lam_ce, lam_kl=r.lam_kl, tau=r.tau)


def bank_hparams(bank) -> dict:
    return {"n": bank.n, "D": bank.D, "H": bank.H, "L": bank.L, "K": bank.K,
            "R": list(bank.R), **{k: v for k, v in bank._hparams().items()
                                  if k in ("act", "dist", "lam_ce", "lam_kl", "tau")}}


def load_bank(path: str | Path, device: torch.device | str = "cpu"):
    """(bank in eval mode with frozen parameters, the file's metadata) from a bank.pt."""
    from cifd_kernels import RDMBank
    path = Path(path)
    if path.is_dir():
        path = path / "bank.pt"
    if not path.is_file():
        raise FileNotFoundError(f"RDM bank {path} not found: run `cifd train-rdms` first "
                                f"(same run.name / run.out_dir), or set cifd.bank=PATH")
    fix = ("Train it again (`cifd train-rdms --overwrite`), or set cifd.bank=PATH to a "
           "good bank.pt")
    blob = load_file(path, "RDM bank file", fix,
                     ("hparams", "state_dict", "weights_hash", "teacher_weights"))
    with guard_read(path, "RDM bank file", fix, RunFileError):
        hp = dict(blob["hparams"])
        n, D, H, L, K, R = (hp.pop(k) for k in ("n", "D", "H", "L", "K", "R"))
        bank = RDMBank(n, D, H, L, K, R=R, **hp)
        bank.load_state_dict(blob["state_dict"])
    bank.to(device).eval()
    for p in bank.parameters():
        p.requires_grad_(False)
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    meta["path"] = str(path)
    return bank, meta


@torch.no_grad()
def bank_outputs(bank, emb: torch.Tensor, batch_size: int = 4096
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen (eval-mode) bank outputs for teacher embeddings ``emb`` [B, D]:
    ``(x_hat [N, B, D], logits [N, B, K])`` fp32. Deterministic (rounding, no noise)."""
    xs, ls = [], []
    for i in range(0, emb.shape[0], batch_size):
        x_hat, logits = bank.frozen_targets(emb[i:i + batch_size])
        xs.append(x_hat)
        ls.append(logits)
    return torch.cat(xs, 1), torch.cat(ls, 1)


@torch.no_grad()
def evaluate_bank(bank, emb: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                  batch_size: int = 4096) -> list[dict]:
    """Per RDM, in eval (frozen) mode over a whole split: mean distortion
    ``dist(X, Xh)`` (per sample, summed over D), mean rate in bits per sample,
    top-1 accuracy of the RDM head, mean ``tau^2 KL(p_T || p_R)``."""
    was = bank.training
    bank.eval()
    n = bank.n
    sums = {k: torch.zeros(n, dtype=torch.float64) for k in ("dist", "rate", "kl", "correct")}
    total = 0
    for i in range(0, emb.shape[0], batch_size):
        x, t, y = emb[i:i + batch_size], logits[i:i + batch_size], labels[i:i + batch_size]
        out = bank(x, t, y)
        b = y.shape[0]
        for k in ("dist", "rate", "kl"):
            sums[k] += out.terms[k].double().cpu() * b
        sums["correct"] += (out.logits.argmax(-1) == y.unsqueeze(0)).sum(1).double().cpu()
        total += b
    bank.train(was)
    return [{"R": bank.R[j], "distortion": sums["dist"][j].item() / total,
             "rate_bits": sums["rate"][j].item() / total / math.log(2),
             "kl": sums["kl"][j].item() / total, "acc": sums["correct"][j].item() / total}
            for j in range(n)]


def plot_rd_curve(results: dict, path: str | Path) -> None:
    """The paper's Figure 5 for this bank: (left) R against distortion and RDM
    accuracy; (right) the rate-distortion curve, points labelled by accuracy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rdms = sorted(results["rdms"], key=lambda r: r["R"])
    R = [r["R"] for r in rdms]
    dist = [r["test"]["distortion"] for r in rdms]
    acc = [100 * r["test"]["acc"] for r in rdms]
    rate = [r["test"]["rate_bits"] for r in rdms]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(R, dist, "o-", color="tab:blue")
    a1.set_xscale("log")
    a1.set_xlabel("distortion weight R")
    a1.set_ylabel("distortion dist(X, Xh) (test)", color="tab:blue")
    b1 = a1.twinx()
    b1.plot(R, acc, "s--", color="tab:red", label="RDM")
    t_acc = results.get("teacher", {}).get("test_acc")
    if t_acc is not None:
        b1.axhline(100 * t_acc, color="tab:red", lw=0.8, ls=":", label="teacher")
    b1.set_ylabel("RDM test accuracy (%)", color="tab:red")
    b1.legend(loc="lower right", fontsize=8)
    a1.set_title("R vs distortion and accuracy")
    a2.plot(rate, dist, "o-")
    for r, d, a, rr in zip(rate, dist, acc, R):
        a2.annotate(f"R={rr:g}\n{a:.1f}%", (r, d), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    a2.set_xlabel("rate (bits per sample, test)")
    a2.set_ylabel("distortion (test)")
    a2.set_title("rate-distortion curve")
    fig.suptitle(f"RDM bank on {results.get('dataset', '')} "
                 f"(teacher {results.get('teacher', {}).get('arch', '')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_rdms(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Train the RDM bank on the cached outputs of the teacher at
    ``teacher.checkpoint`` (default ``<out_dir>/<name>/teacher/model.pt``);
    returns results.json's contents (``complete`` False when stopped early by
    ``run.stop_after``).

    Under torchrun, rank 0 trains the bank alone while the other ranks wait:
    stage 1 is a few small MLPs on cached embeddings (seconds to minutes on one
    device), so the run is the single-process one, bit for bit."""
    from .distributed import on_main
    return on_main(lambda: _train_rdms(cfg, resume=resume, overwrite=overwrite))


def _train_rdms(cfg: Config, *, resume: bool, overwrite: bool) -> dict:
    set_threads(cfg.run.threads)
    device = select_device(cfg.run.device)
    ds = load_data(cfg)
    teacher, tmeta = load_model_file(default_teacher_checkpoint(cfg), device)
    check_teacher_data(tmeta, ds)
    cache_dir = Path(tmeta["path"]).parent / "cache"
    outs = {s: teacher_outputs(teacher, tmeta["arch"], ds, s, cache_dir,
                               batch_size=cfg.data.eval_batch_size,
                               num_workers=cfg.data.num_workers, device=device)
            for s in ("train", "val", "test")}
    X, T, Y = (t.to(device) for t in (outs["train"].embeddings, outs["train"].logits,
                                       outs["train"].labels))
    D, K = X.shape[1], T.shape[1]

    torch.manual_seed(cfg.rdm.seed)  # parameter init
    bank = build_bank(cfg, D, K).to(device)
    eb = bank.entropy_bottleneck
    aux = [eb.quantiles]
    main = [p for p in bank.parameters() if p is not eb.quantiles]
    opt = torch.optim.Adam([{"params": main, "lr": cfg.rdm.lr},
                            {"params": aux, "lr": cfg.rdm.aux_lr}], **fused_kwargs(main + aux))
    n_train, bs = X.shape[0], cfg.rdm.batch_size
    steps_per_epoch = -(-n_train // bs)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, [LRSchedule("cosine", cfg.rdm.epochs * steps_per_epoch), LRSchedule("constant", 1)])
    order_gen = torch.Generator().manual_seed(cfg.rdm.seed)
    extra = {"teacher_weights": tmeta["weights_hash"]}
    ident = RunIdentity(config_hash(cfg, RDM_SECTIONS, extra), hashed_items(cfg, RDM_SECTIONS),
                        to_dict(cfg))

    run_dir = rdm_run_dir(cfg)
    ckpt_path = run_dir / "checkpoint.pt"
    if ckpt_path.exists() and not (resume or overwrite):
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, "
                              f"--overwrite to start it again, or choose another run.name")
    start = 0
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, ident)
        with guard_read(ckpt_path, "checkpoint", RESUME_FIX, RunFileError):
            bank.load_state_dict(ckpt["modules"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            order_gen.set_state(ckpt["data"]["order_gen"])
            set_rng_state(ckpt["rng"])
            start = ckpt["epoch"]
        print(f"[rdms] resuming {run_dir} after epoch {start}/{cfg.rdm.epochs}", flush=True)
    log = MetricsLog(run_dir / "metrics.jsonl", keep_through=start if (resume and start) else None)
    from .config import dump_yaml
    atomic_write_text(dump_yaml(cfg), run_dir / "config.yaml")
    print(f"train-rdms: {bank.n} RDMs (R = {list(bank.R)}, D={D} H={bank.H} L={bank.L}) on "
          f"the cached outputs of {tmeta['path']}, {cfg.rdm.epochs} epochs -> {run_dir}",
          flush=True)

    epochs = cfg.rdm.epochs
    end = min(epochs, start + cfg.run.stop_after) if cfg.run.stop_after > 0 else epochs
    for epoch in range(start, end):
        bank.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        perm = torch.randperm(n_train, generator=order_gen).to(device)
        for i in range(steps_per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            seed = derive_seed(cfg.rdm.seed, sched.last_epoch, STREAM_RDM)
            out = bank(X[idx], T[idx], Y[idx], seed=seed)
            loss = out.loss + bank.aux_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += out.loss.detach().double() * idx.numel()
        train_time = time.perf_counter() - t0
        val = evaluate_bank(bank, *(t.to(device) for t in (
            outs["val"].embeddings, outs["val"].logits, outs["val"].labels)))
        log.log(epoch=epoch + 1, train_loss=loss_sum.item() / n_train,
                epoch_time_s=round(train_time, 3),
                val=[{k: v for k, v in r.items()} for r in val])
        atomic_save({"format_version": FORMAT_VERSION,
                     "modules": bank.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(),
                     "data": {"order_gen": order_gen.get_state()}, "rng": rng_state(),
                     "epoch": epoch + 1, "config_hash": ident.config_hash,
                     "config_items": ident.items, "config": ident.config}, ckpt_path)
        print(f"[rdms] epoch {epoch + 1}/{epochs}: train loss {loss_sum.item() / n_train:.3f}"
              f" | val acc " + " ".join(f"R={r['R']:g}:{r['acc']:.4f}" for r in val)
              + f" | {train_time:.1f}s", flush=True)
    done = max(end, start)
    if done < epochs:
        print(f"[rdms] stopped after epoch {done}/{epochs} (run.stop_after); continue with "
              f"--resume", flush=True)
        return {"complete": False, "epochs_done": done}

    # ---- the trained bank, evaluated frozen, and its files
    state = {k: v.detach().cpu() for k, v in bank.state_dict().items()}
    bank_file = run_dir / "bank.pt"
    atomic_save({"format_version": FORMAT_VERSION, "hparams": bank_hparams(bank),
                 "state_dict": state, "weights_hash": weights_hash(state),
                 "teacher_weights": tmeta["weights_hash"],
                 "teacher_path": tmeta["path"], "config": ident.config,
                 "config_hash": ident.config_hash}, bank_file)
    evals = {s: evaluate_bank(bank, *(t.to(device) for t in (
        outs[s].embeddings, outs[s].logits, outs[s].labels))) for s in ("val", "test")}
    records = [r for r in log.read() if "epoch_time_s" in r]
    t_acc = {s: (outs[s].logits.argmax(1) == outs[s].labels).double().mean().item()
             for s in ("val", "test")}
    results = {
        "complete": True, "dataset": ds.name, "bank_path": str(bank_file),
        "weights_hash": weights_hash(state), "epochs": epochs,
        "teacher": {"path": tmeta["path"], "arch": tmeta["arch"], "D": D,
                    "val_acc": t_acc["val"], "test_acc": t_acc["test"],
                    "embedding_mean_sq_norm": X.double().pow(2).sum(1).mean().item()},
        "rdms": [{"R": bank.R[j], "val": evals["val"][j], "test": evals["test"][j]}
                 for j in range(bank.n)],
        "total_train_time_s": sum(r["epoch_time_s"] for r in records),
        "steps": epochs * steps_per_epoch, "batch_size": bs,
        "units": {"distortion": f"{cfg.rdm.distortion}, summed over D, mean over samples",
                  "rate_bits": "bits per sample (eval mode: rounded latent)"},
    }
    # FLOPs of one stage-1 step (forward + backward) on a full batch.
    from .engine import measure_step_flops
    idx = torch.arange(min(bs, n_train), device=device)
    step_flops = measure_step_flops(
        bank, lambda _: bank(X[idx], T[idx], Y[idx], seed=0).loss + bank.aux_loss(), None)
    results["flops_per_step"] = step_flops
    results["train_flops"] = step_flops * results["steps"]
    plot_rd_curve(results, run_dir / "rd_curve.png")
    results["plot"] = str(run_dir / "rd_curve.png")
    atomic_write_text(json.dumps(results, indent=2) + "\n", run_dir / "results.json")
    print("[rdms] frozen bank (eval mode), test split:", flush=True)
    for r in results["rdms"]:
        t = r["test"]
        print(f"[rdms]   R={r['R']:<8g} distortion {t['distortion']:9.4f}  rate "
              f"{t['rate_bits']:8.2f} bits  acc {t['acc']:.4f}", flush=True)
    print(f"[rdms]   teacher acc {t_acc['test']:.4f}; results {run_dir / 'results.json'}, "
          f"plot {run_dir / 'rd_curve.png'}", flush=True)
    return results
