# SPDX-License-Identifier: Apache-2.0
"""The text recipes: a pretrained sentence encoder distilled into a tiny
bag-of-word-pieces student, by embedding KD, InfoNCE and CIFD.

Stages (each cached or resumable; ``run_text``):

1. **Corpus** (:mod:`.corpus`): the fortunes texts, deduplicated, split by hash.
2. **Teacher outputs**, once per (model, corpus): the teacher's mean-pooled,
   normalised embedding of every text (``X`` is it times ``sqrt(D)``: unit RMS per
   coordinate), the embeddings of the topic prompts
   (zero-shot prototypes), the student's word-piece matrix. ``task: topics`` also
   trains the teacher's linear head on the cached train embeddings (epoch chosen
   on validation) and keeps its logits.
3. **Stage 1**: an :class:`cifd_kernels.RDMBank` on the train embeddings, head-less
   (``K = 0``, ``R * dist + rate``) for ``embedding``, headed for ``topics``; then
   its frozen targets (reconstructions, logits) for every train text.
4. **Students**, arm x seed (``study.sweep`` on ``study.sweep_seed``, then
   ``study.arms`` x ``study.seeds``), ``study.jobs`` processes side by side.
   Seed s = the same student initialisation and batch order in every arm.
5. **Report**: metrics per run on validation and test; ``@best`` arms take the
   sweep's best overrides by the validation metric; paired differences on test
   against ``study.baseline`` with a 95% t-interval; ``results.json``, plots.

Methods, ``embedding`` task (the student's output is ``U = proj(W)``; the
losses use :class:`cifd_kernels.CIFDEmbeddingLoss`, ``w_emb`` in the paper's
mean-over-D units, InfoNCE pairs ``U`` with the teacher embedding of the same
text, the other texts of the batch being the negatives):

- ``nce``: InfoNCE alone;  ``kd``: ``dist(U, X)`` alone;  ``kd_nce``: both;
- ``cifd``: the IBM on ``W`` (training only), ``dist(U, X) + lam_rdm sum_n
  dist(U, Xh_n)``, ``lam_I`` rate, InfoNCE.

``topics`` task (the student has a head on ``W``; :class:`cifd_kernels.CIFDLoss`):
``scratch`` (CE), ``kd`` (CE + KL to the teacher), ``takd`` (a wider bag student
as teacher assistant, distilled from the teacher, then the student from it) and
``cifd`` (RDM logits and reconstructions as extra targets, KD-dropout, the IBM,
``U = proj(Wh)`` against ``X`` and ``Xh_n``).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, apply_overrides
from ..engine import atomic_save, atomic_write_text
from ..study import t975
from . import corpus as _corpus
from . import encoder as _enc
from .config import METHODS, TextConfig, run_dir, text_config_from_dict

Log = Callable[[str], None]


def config_hash_dict(d: dict) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- models

class BagStudent(nn.Module):
    """``W = fc2(relu(fc1(mean of word-piece embeddings)))`` ``[B, width]``, plus
    ``proj`` (``width -> D``, into the teacher's space) and, with ``K > 0``, a head
    (``width -> K``). ``ids``: ``[B, T]`` int64, ``pad`` entries left out of the mean."""

    def __init__(self, vocab: int, pad: int, dim: int, hidden: int, width: int, D: int, K: int = 0):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, dim, mode="mean", padding_idx=pad)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.proj = nn.Linear(width, D)
        self.head = nn.Linear(width, K) if K > 0 else None

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self.bag(ids))))

    def inference_params(self, with_proj: bool = True, with_head: bool = True) -> int:
        mods = [self.bag, self.fc1, self.fc2] + ([self.proj] if with_proj else []) \
            + ([self.head] if with_head and self.head is not None else [])
        return sum(p.numel() for m in mods for p in m.parameters())


# ----------------------------------------------------------------------------- metrics

def knn_recall(U: torch.Tensor, X: torch.Tensor, k: int = 10) -> float:
    """Mean overlap of each text's k nearest neighbours (cosine, itself excluded)
    under the student's embeddings ``U`` and the teacher's ``X`` (``[n, D]``)."""
    n = U.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return float("nan")
    def nn_mask(E):
        E = F.normalize(E.float(), dim=-1)
        S = E @ E.t()
        S.fill_diagonal_(-float("inf"))
        idx = S.topk(k, dim=1).indices
        return torch.zeros(n, n, dtype=torch.bool).scatter_(1, idx, True)
    return float((nn_mask(U) & nn_mask(X)).sum(1).float().mean() / k)


def zero_shot_acc(E: torch.Tensor, prompts: torch.Tensor, labels: torch.Tensor) -> float:
    """CLIP-style: the class whose prompt embedding is the nearest (cosine)."""
    S = F.normalize(E.float(), dim=-1) @ F.normalize(prompts.float(), dim=-1).t()
    return float((S.argmax(1) == labels).float().mean())


def train_linear(Z: dict, y: dict, K: int, *, steps: int, lr: float, wd: float, seed: int = 0,
                 every: int = 10) -> tuple[nn.Linear, float, int]:
    """Full-batch AdamW logistic regression on ``Z['train']``; the step with the best
    validation accuracy is kept. Returns ``(head, val_acc, step)``."""
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(Z["train"].shape[1], K)
    with torch.no_grad():
        bound = 1.0 / math.sqrt(Z["train"].shape[1])
        head.weight.copy_(torch.empty_like(head.weight).uniform_(-bound, bound, generator=g))
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=wd)
    best = (-1.0, 0, copy.deepcopy(head.state_dict()))
    Z = {k: v.detach() for k, v in Z.items()}
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():  # also when called under no_grad (evaluation)
            F.cross_entropy(head(Z["train"]), y["train"]).backward()
        opt.step()
        if step % every == 0 or step == steps:
            with torch.no_grad():
                acc = float((head(Z["val"]).argmax(1) == y["val"]).float().mean())
            if acc > best[0]:
                best = (acc, step, copy.deepcopy(head.state_dict()))
    head.load_state_dict(best[2])
    return head, best[0], best[1]


def linear_probe(E: dict, y: dict, K: int) -> float:
    """Test accuracy of a logistic-regression probe on normalised embeddings scaled
    to unit RMS per coordinate (times ``sqrt(D)``: the probe's AdamW then reaches
    its validation optimum within its 150 steps; the step is chosen on validation)."""
    Z = {s: F.normalize(e.float(), dim=-1) * math.sqrt(e.shape[1]) for s, e in E.items()}
    head, _, _ = train_linear(Z, y, K, steps=150, lr=1e-2, wd=1e-4)
    with torch.no_grad():
        return float((head(Z["test"]).argmax(1) == y["test"]).float().mean())


def kl_nats(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """Mean ``KL(softmax(T) || softmax(S))`` in nats (temperature 1): how far a
    student's (or an RDM's) predictive distribution is from the teacher's."""
    lt = F.log_softmax(teacher_logits.float(), dim=1)
    ls = F.log_softmax(student_logits.float(), dim=1)
    return float((lt.exp() * (lt - ls)).sum(1).mean())


# ----------------------------------------------------------------------------- stage 0: data

def _log_default(msg: str) -> None:
    print(f"[text] {msg}", flush=True)


def cache_dir(cfg: TextConfig) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.run.out_dir) / "text_cache"


def load_corpus(cfg: TextConfig) -> _corpus.TextCorpus:
    return _corpus.load_fortunes(cfg.data.dir or None, exclude=cfg.data.exclude,
                                 min_per_topic=cfg.data.min_per_topic, min_chars=cfg.data.min_chars)


_CACHE_KEYS = {"emb": 2, "prompts": 2, "ids": 2}


def teacher_cache(cfg: TextConfig, corpus: _corpus.TextCorpus, log: Log = _log_default) -> dict:
    """The teacher's outputs for ``corpus`` (module docstring, stage 2), computed
    once and kept in ``cache_dir`` under a name that hashes the model files, the
    texts, the prompts and the token limits. An unreadable or inconsistent cache
    file is reported and recomputed."""
    model_dir = Path(cfg.teacher.model) if cfg.teacher.model else _enc.default_teacher_dir()
    max_tokens = cfg.teacher.max_tokens or _enc.teacher_max_tokens(model_dir)
    prompts = corpus.prompts()
    key = _enc.texts_digest(corpus.texts + prompts, corpus.labels + [-1] * len(prompts))
    fp = _enc.model_fingerprint(model_dir)
    path = cache_dir(cfg) / f"teacher-{fp}-{key}-t{max_tokens}-s{cfg.data.student_max_tokens}.pt"
    if path.is_file():
        try:
            c = torch.load(path, map_location="cpu", weights_only=True)
            ok = (isinstance(c, dict) and all(isinstance(c.get(k), torch.Tensor) and c[k].dim() == d
                                             for k, d in _CACHE_KEYS.items())
                  and c["emb"].shape[0] == len(corpus.texts) == c["ids"].shape[0]
                  and c["prompts"].shape[0] == len(prompts))
            if ok:
                log(f"teacher outputs from cache {path}")
                return c
            log(f"cache {path} is inconsistent with the corpus; recomputing")
        except Exception as e:  # noqa: BLE001 - any unreadable cache is recomputed
            log(f"cache {path} unreadable ({type(e).__name__}: {e}); recomputing")
    tok, model = _enc.load_teacher(model_dir)
    t0 = time.time()
    last = [0.0]

    def progress(done, total):
        if time.time() - last[0] > 30 or done == total:
            last[0] = time.time()
            log(f"encoding with the teacher: {done}/{total} texts, {time.time() - t0:.0f}s")
    emb = _enc.encode(corpus.texts, tok, model, max_tokens=max_tokens, batch_size=cfg.teacher.batch_size,
                      progress=progress)
    P = _enc.encode(prompts, tok, model, max_tokens=max_tokens, batch_size=cfg.teacher.batch_size)
    ids, pad = _enc.bag_matrix(corpus.texts, tok, max_tokens=cfg.data.student_max_tokens)
    c = {"emb": emb, "prompts": P, "ids": ids, "pad": torch.tensor(pad), "vocab": torch.tensor(len(tok)),
         "teacher_params": torch.tensor(sum(p.numel() for p in model.parameters())),
         "encode_s": torch.tensor(time.time() - t0)}
    atomic_save(c, path)
    log(f"teacher outputs cached in {path} ({time.time() - t0:.0f}s)")
    return c


def teacher_head(cfg: TextConfig, X: dict, y: dict, K: int) -> tuple[nn.Linear, float]:
    """The topics teacher's linear head on frozen embeddings (validation-chosen)."""
    head, val_acc, _ = train_linear(X, y, K, steps=cfg.teacher.head_epochs, lr=cfg.teacher.head_lr,
                                    wd=cfg.teacher.head_wd, every=5)
    return head, val_acc


# ----------------------------------------------------------------------------- stage 1: the bank

def bank_hash(cfg: TextConfig, data_key: str) -> str:
    return config_hash_dict({"rdm": dataclasses.asdict(cfg.rdm), "task": cfg.task, "data": data_key})


def train_bank(cfg: TextConfig, X: dict, y: dict, T: Optional[dict], log: Log = _log_default):
    """Stage 1: ``RDMBank`` on the train embeddings (Adam, cosine; the entropy
    model's quantiles in their own group). Returns ``(bank, report)``; the report
    holds per-R validation/test distortion, rate (bits a text) and accuracy."""
    from ...nn import RDMBank
    r = cfg.rdm
    D = X["train"].shape[1]
    K = 0 if T is None else T["train"].shape[1]
    torch.manual_seed(r.seed)
    bank = RDMBank(len(r.rates), D, r.hidden, r.latent, K, R=r.rates, dist="mse",
                   lam_ce=r.lam_ce, lam_kl=r.lam_kl, tau=r.tau)
    aux = [bank.entropy_bottleneck.quantiles]
    main = [p for p in bank.parameters() if p is not aux[0]]
    opt = torch.optim.Adam([{"params": main, "lr": r.lr}, {"params": aux, "lr": r.aux_lr}])
    n = X["train"].shape[0]
    steps_per = math.ceil(n / r.batch_size)
    total = r.epochs * steps_per
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, [lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)), lambda s: 1.0])
    g = torch.Generator().manual_seed(r.seed)
    step = 0
    t0 = time.time()
    for epoch in range(r.epochs):
        bank.train()
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        for i in range(0, n, r.batch_size):
            idx = perm[i:i + r.batch_size]
            out = bank(X["train"][idx], None if T is None else T["train"][idx],
                       None if T is None else y["train"][idx], seed=r.seed,
                       offset=step * bank.n * r.batch_size * bank.L)
            loss = out.loss + bank.aux_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            tot += float(out.loss.detach()) * len(idx)
        if epoch == r.epochs - 1 or (epoch + 1) % 10 == 0:
            log(f"stage 1 (RDM bank, R={list(r.rates)}): epoch {epoch + 1}/{r.epochs} loss "
                f"{tot / n:.4f} ({time.time() - t0:.0f}s)")
    bank.eval()
    report = {"R": list(r.rates), "train_s": time.time() - t0}
    for split in ("val", "test"):
        with torch.no_grad():
            out = bank(X[split])
        ln2 = math.log(2.0)
        report[split] = {
            "dist": [float(v) for v in out.terms["dist"]],
            "rate_bits": [float(v) / ln2 for v in out.terms["rate"]],
            "cos": [float(F.cosine_similarity(out.x_hat[j], X[split], dim=-1).mean()) for j in range(bank.n)]}
        if T is not None:
            report[split]["acc"] = [float((out.logits[j].argmax(1) == y[split]).float().mean())
                                    for j in range(bank.n)]
            report[split]["kl_T"] = [kl_nats(T[split], out.logits[j]) for j in range(bank.n)]
    return bank, report


# ----------------------------------------------------------------------------- stage 2: students

def _splits(corpus) -> dict:
    return {s: torch.tensor(corpus.indices(s), dtype=torch.int64) for s in _corpus.SPLITS}


def prepare(cfg: TextConfig, log: Log = _log_default) -> dict:
    """Stages 1-3: everything the student runs share, saved to ``shared.pt`` in the
    run directory (reused when the data and bank hashes match)."""
    corpus = load_corpus(cfg)
    log(f"corpus: {len(corpus.texts)} texts, {len(corpus.topics)} topics "
        f"(train {len(corpus.indices('train'))}, val {len(corpus.indices('val'))}, "
        f"test {len(corpus.indices('test'))})")
    c = teacher_cache(cfg, corpus, log)
    sp = _splits(corpus)
    labels = torch.tensor(corpus.labels, dtype=torch.int64)
    # X: the teacher's normalised embedding times sqrt(D), unit RMS per coordinate
    # (the scale of the image recipes' features). Every metric is a cosine, so the
    # scale changes none; it puts the RDMs' latents and the IBM's unit-width noise
    # at a workable scale (on unit-norm X, coordinates ~0.05, the banks stalled
    # near 0.5 cosine whatever R).
    emb = c["emb"] * math.sqrt(c["emb"].shape[1])
    X = {s: emb[i] for s, i in sp.items()}
    y = {s: labels[i] for s, i in sp.items()}
    K = len(corpus.topics)
    data_key = _enc.texts_digest(corpus.texts, corpus.labels) + f"-{c['emb'].shape}"
    rd = run_dir(cfg)
    rd.mkdir(parents=True, exist_ok=True)
    # "v2": shared.pt holds the teacher logits in corpus order
    bh = bank_hash(cfg, "v2" + data_key + json.dumps(dataclasses.asdict(cfg.teacher)))
    path = rd / "shared.pt"
    if path.is_file():
        try:
            sh = torch.load(path, map_location="cpu", weights_only=False)
            if sh.get("bank_hash") == bh:
                log(f"stage 1 and teacher head from {path}")
                return sh
        except Exception as e:  # noqa: BLE001
            log(f"{path} unreadable ({type(e).__name__}); recomputing")
    teacher = {"params": int(c["teacher_params"]), "encode_s": float(c["encode_s"])}
    T = None
    if cfg.task == "topics":
        head, val_acc = teacher_head(cfg, X, y, K)
        with torch.no_grad():
            T = {s: head(X[s]) for s in X}
        teacher.update(val_acc=val_acc, test_acc=float((T["test"].argmax(1) == y["test"]).float().mean()))
        log(f"teacher head: val acc {val_acc:.4f}, test acc {teacher['test_acc']:.4f}")
    teacher["zero_shot_test"] = zero_shot_acc(X["test"], c["prompts"], y["test"])
    teacher["probe_test"] = linear_probe(X, y, K)
    log(f"teacher: zero-shot topic acc {teacher['zero_shot_test']:.4f}, linear probe "
        f"{teacher['probe_test']:.4f} (test)")
    bank, report = train_bank(cfg, X, y, T, log)
    for j, R in enumerate(cfg.rdm.rates):
        extra = f", acc {report['test']['acc'][j]:.4f}" if T is not None else ""
        log(f"  RDM R={R:g}: test distortion {report['test']['dist'][j]:.4f}, rate "
            f"{report['test']['rate_bits'][j]:.1f} bits, cos {report['test']['cos'][j]:.4f}{extra}")
    with torch.no_grad():
        out = bank(X["train"])
    sh = {"bank_hash": bh, "task": cfg.task, "topics": corpus.topics, "K": K,
          "ids": c["ids"], "pad": int(c["pad"]), "vocab": int(c["vocab"]), "prompts": c["prompts"],
          "splits": sp, "labels": labels, "emb": emb, "teacher": teacher, "bank": report,
          "rdm_xhat": out.x_hat.contiguous(),                      # [N, n_train, D]
          "rdm_logits": out.logits.contiguous() if T is not None else None,
          "teacher_logits": None if T is None else _in_corpus_order(T, sp)}  # [n_texts, K]
    atomic_save(sh, path)
    return sh


def _in_corpus_order(per_split: dict, sp: dict) -> torch.Tensor:
    """Per-split rows ``{split: [n_split, ...]}`` as one tensor in corpus order."""
    first = per_split["train"]
    out = first.new_empty((sum(len(i) for i in sp.values()),) + tuple(first.shape[1:]))
    for split, idx in sp.items():
        out[idx] = per_split[split]
    return out


def _cosine_lr(opt, total):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))


def _new_student(cfg: TextConfig, sh: dict, seed: int, dim: int, hidden: int) -> BagStudent:
    torch.manual_seed(seed)
    K = sh["K"] if cfg.task == "topics" else 0
    return BagStudent(sh["vocab"], sh["pad"], dim, hidden, cfg.student.width, sh["emb"].shape[1], K)


@torch.no_grad()
def _student_features(sh: dict, student: BagStudent, idx: torch.Tensor) -> torch.Tensor:
    """The student's embedding ``W`` of the texts ``idx`` (IBM removed), in chunks."""
    return torch.cat([student.features(sh["ids"][idx[i:i + 1024]]) for i in range(0, len(idx), 1024)])


def _head_metrics(sh: dict, student: BagStudent, idx: torch.Tensor, W: torch.Tensor) -> dict:
    """Topics task: accuracy and KL(teacher || student) in nats of the texts ``idx``."""
    S = student.head(W)
    return {"acc": float((S.argmax(1) == sh["labels"][idx]).float().mean()),
            "kl_T": kl_nats(sh["teacher_logits"][idx], S)}  # distance to the teacher


def evaluate(cfg: TextConfig, sh: dict, student: BagStudent) -> dict:
    """Validation and test metrics of a trained student (IBM removed)."""
    student.eval()
    out = {}
    emb_task = cfg.task == "embedding"
    E = {}
    for split in _corpus.SPLITS:
        idx = sh["splits"][split]
        W = _student_features(sh, student, idx)
        y = sh["labels"][idx]
        m = {}
        if emb_task:
            U = student.proj(W)
            E[split] = U
            X = sh["emb"][idx]
            m["cos"] = float(F.cosine_similarity(U, X, dim=-1).mean())
            if split != "train":
                m["recall10"] = knn_recall(U, X, 10)
                m["zero_shot"] = zero_shot_acc(U, sh["prompts"], y)
        else:
            m.update(_head_metrics(sh, student, idx, W))
        m["w_rms"] = float(W.float().pow(2).mean().sqrt())   # the student embedding's spread
        out[split] = m
    if emb_task:
        yy = {s: sh["labels"][sh["splits"][s]] for s in _corpus.SPLITS}
        out["test"]["probe"] = linear_probe(E, yy, sh["K"])
    if emb_task:
        del out["train"]  # the embedding metrics are for held-out texts
    return out


def _method_loss(cfg: TextConfig, method: str, sh: dict, D: int):
    """The loss module of a method and its target weights."""
    from ...nn import CIFDEmbeddingLoss, CIFDLoss
    c, k = cfg.cifd, cfg.kd
    n = sh["rdm_xhat"].shape[0]
    if cfg.task == "embedding":
        if method == "cifd":
            return CIFDEmbeddingLoss([1.0] + [c.lam_rdm] * n, w_emb=c.w_emb / D, p_drop=c.p_drop,
                                     lam_I=c.lam_I, lam_cl=c.lam_cl, temperature=c.temperature)
        return CIFDEmbeddingLoss([1.0], w_emb=0.0 if method == "nce" else c.w_emb / D, p_drop=0.0,
                                 lam_I=0.0, lam_cl=0.0 if method == "kd" else c.lam_cl,
                                 temperature=c.temperature)
    if method == "cifd":
        return CIFDLoss([1.0] + [c.lam_rdm] * n, tau=k.tau, p_drop=c.p_drop, lam_ce=k.lam_ce,
                        lam_kl=k.lam_kl, w_emb=c.w_emb, lam_I=c.lam_I)  # paper units: it divides by D
    return CIFDLoss([1.0], tau=k.tau, p_drop=0.0, lam_ce=k.lam_ce, lam_kl=k.lam_kl, w_emb=0.0, lam_I=0.0)


def fit_student(cfg: TextConfig, sh: dict, method: str, seed: int, *, dim: Optional[int] = None,
                hidden: Optional[int] = None, target_logits: Optional[torch.Tensor] = None,
                log: Optional[Log] = None) -> tuple[BagStudent, dict]:
    """Train one student (module docstring) and return it with its record.

    ``target_logits`` ``[n_texts, K]`` replaces the teacher's logits (TAKD's student
    learns from its assistant)."""
    from ...nn import IBM
    D = sh["emb"].shape[1]
    student = _new_student(cfg, sh, seed, dim or cfg.student.dim, hidden or cfg.student.hidden)
    ibm = None
    params = [{"params": list(student.parameters()), "weight_decay": cfg.train.weight_decay}]
    if method == "cifd":
        ibm = IBM(cfg.student.width, rho=cfg.cifd.ibm_rho, s=cfg.cifd.ibm_s)
        params.append({"params": list(ibm.parameters()), "weight_decay": 0.0})
    loss_fn = None if method == "scratch" else _method_loss(cfg, method, sh, D)
    # fused: the same AdamW update in one pass over each tensor (the 30522 x 32 word-piece
    # table dominates the step; 4.2 ms -> 0.9 ms a step on this CPU)
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, fused=True)
    tr = sh["splits"]["train"]
    n = len(tr)
    B = cfg.data.batch_size
    total = cfg.train.epochs * math.ceil(n / B)
    sched = _cosine_lr(opt, total)
    g = torch.Generator().manual_seed(seed)
    T = None
    if cfg.task == "topics" and method != "scratch":
        T = (target_logits if target_logits is not None else sh["teacher_logits"])[tr]
    ids_tr, X_tr, y_tr = sh["ids"][tr], sh["emb"][tr], sh["labels"][tr]
    philox_seed = 1_000_003 * (seed + 1)
    # learning curves (train.trace): validation after every epoch, no randomness drawn,
    # so the run's bits are those of an untraced run
    trace = {"epoch": [], "val_acc": [], "val_kl_T": []} \
        if cfg.train.trace and cfg.task == "topics" else None
    t0 = time.time()
    step = 0
    for epoch in range(cfg.train.epochs):
        student.train()
        if ibm is not None:
            ibm.train()
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        for i in range(0, n, B):
            idx = perm[i:i + B]
            W = student.features(ids_tr[idx])
            rate = None
            if ibm is not None:
                W, rate = ibm(W, seed=philox_seed, offset=step * W.numel())
            if cfg.task == "embedding":
                U = student.proj(W)
                tg = X_tr[idx][None]
                if method == "cifd":
                    tg = torch.cat([tg, sh["rdm_xhat"][:, idx]])
                loss, _ = loss_fn(U, tg, contrast_emb=X_tr[idx], ibm_rate=rate, seed=philox_seed + 1,
                                  offset=step * tg.shape[0])
            else:
                logits = student.head(W)
                if method == "scratch":
                    loss = F.cross_entropy(logits, y_tr[idx])
                elif method == "cifd":
                    tl = torch.cat([T[idx][None], sh["rdm_logits"][:, idx]])
                    te = torch.cat([X_tr[idx][None], sh["rdm_xhat"][:, idx]])
                    loss, _ = loss_fn(logits, tl, y_tr[idx], student.proj(W), te, rate,
                                      seed=philox_seed + 1, offset=step * tl.shape[0])
                else:
                    loss, _ = loss_fn(logits, T[idx][None], y_tr[idx], seed=philox_seed + 1,
                                      offset=step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            tot += float(loss.detach()) * len(idx)
        if not math.isfinite(tot):
            raise FloatingPointError(f"{method} seed {seed}: the loss diverged (non-finite) in "
                                     f"epoch {epoch + 1}; lower train.lr or the loss weights")
        if log is not None and (epoch + 1) % 10 == 0:
            log(f"{method} seed {seed}: epoch {epoch + 1}/{cfg.train.epochs} loss {tot / n:.4f}")
        if trace is not None:
            student.eval()
            with torch.no_grad():
                vi = sh["splits"]["val"]
                m = _head_metrics(sh, student, vi, _student_features(sh, student, vi))
            trace["epoch"].append(epoch + 1)
            trace["val_acc"].append(m["acc"])
            trace["val_kl_T"].append(m["kl_T"])
    rec = {"train_s": time.time() - t0,
           "params": student.inference_params(with_proj=cfg.task == "embedding"),
           "final_loss": tot / n}
    if trace is not None:
        rec["trace"] = trace
    if ibm is not None:  # the IBM's rate on validation texts, in nats per channel
        student.eval()
        with torch.no_grad():
            Wv = student.features(sh["ids"][sh["splits"]["val"]])
            _, rate = ibm(Wv, seed=philox_seed + 2)
        rec["ibm_rate_per_channel"] = float(rate.mean()) / cfg.student.width
    return student, rec


def run_arm(cfg: TextConfig, sh: dict, method: str, seed: int, log: Optional[Log] = None) -> dict:
    """One arm x seed: train, evaluate, return the record (metrics under val/test)."""
    if method not in METHODS[cfg.task]:
        raise ConfigError(f"method {method!r} is not one of {', '.join(METHODS[cfg.task])} "
                          f"(task {cfg.task})")
    t0 = time.time()
    extra = {}
    target_logits = None
    if method == "takd":
        ta, ta_rec = fit_student(cfg, sh, "kd", seed, dim=cfg.takd.dim, hidden=cfg.takd.hidden, log=log)
        ta_ev = evaluate(cfg, sh, ta)
        with torch.no_grad():
            ta.eval()
            target_logits = torch.cat([ta.head(ta.features(sh["ids"][i:i + 1024]))
                                       for i in range(0, sh["ids"].shape[0], 1024)])
        extra["ta"] = {"params": ta_rec["params"], "val": ta_ev["val"], "test": ta_ev["test"],
                       "train_s": ta_rec["train_s"]}
    student, rec = fit_student(cfg, sh, "kd" if method == "takd" else method, seed,
                               target_logits=target_logits, log=log)
    ev = evaluate(cfg, sh, student)
    if "train" in ev:
        extra["train"] = ev["train"]  # the generalisation gap (topics task)
    return {"method": method, "seed": seed, **rec, **extra, "val": ev["val"], "test": ev["test"],
            "wall_s": time.time() - t0}


# ----------------------------------------------------------------------------- study

def default_metric(task: str) -> str:
    return "recall10" if task == "embedding" else "acc"


def parse_arm(text: str, task: str) -> tuple[str, str, list[str]]:
    parts = text.split()
    if len(parts) < 2:
        raise ConfigError(f"arm {text!r}: expected 'NAME METHOD [KEY=VALUE ...]'")
    name, method, overrides = parts[0], parts[1], parts[2:]
    if method not in METHODS[task]:
        raise ConfigError(f"arm {text!r}: method {method!r} is not one of "
                          f"{', '.join(METHODS[task])} (task {task})")
    return name, method, overrides


def _arm_cfg(cfg: TextConfig, overrides: Sequence[str]) -> TextConfig:
    c = copy.deepcopy(cfg)
    try:
        apply_overrides(c, overrides)
    except ConfigError as e:
        raise ConfigError(f"arm override: {e}") from None
    for o in overrides:
        if o.split("=", 1)[0].strip().split(".")[0] in ("data", "teacher", "rdm", "run", "study", "task"):
            raise ConfigError(f"arm override {o!r}: arms may change the student, train, kd, cifd "
                              f"and takd sections only (the shared stages are computed once)")
    return c


def _worker(cfg_dict: dict, overrides: list, method: str, seed: int, shared_path: str, out_path: str,
            threads: int) -> dict:
    torch.set_num_threads(threads)
    cfg = _arm_cfg(text_config_from_dict(cfg_dict), overrides)
    sh = torch.load(shared_path, map_location="cpu", weights_only=False)
    rec = run_arm(cfg, sh, method, seed)
    rec["overrides"] = list(overrides)
    atomic_write_text(json.dumps(rec, indent=1), out_path)
    return rec


def _run_key(method: str, overrides: Sequence[str], seed: int, cfg: TextConfig) -> str:
    base = {k: dataclasses.asdict(getattr(cfg, k)) for k in ("student", "train", "kd", "cifd", "takd")}
    return config_hash_dict({"m": method, "o": list(overrides), "s": seed, "base": base})


def run_many(cfg: TextConfig, sh: dict, jobs: Sequence[tuple[str, str, list, int]], log: Log) -> dict:
    """Run ``(name, method, overrides, seed)`` jobs side by side (``study.jobs``
    processes, ``run.threads`` threads each); finished runs are read back."""
    rd = run_dir(cfg) / "runs"
    rd.mkdir(parents=True, exist_ok=True)
    results, todo = {}, []
    for name, method, ov, seed in jobs:
        path = rd / f"{name}-s{seed}-{_run_key(method, ov, seed, cfg)}.json"
        if path.is_file():
            try:
                results[(name, seed)] = json.loads(path.read_text())
                continue
            except (OSError, ValueError):
                pass
        todo.append((name, method, ov, seed, path))
    if not todo:
        return results
    shared = str(run_dir(cfg) / "shared.pt")
    cfg_dict = dataclasses.asdict(cfg)
    t0 = time.time()
    done = 0

    def report(name, seed, rec):
        nonlocal done
        done += 1
        key = default_metric(cfg.task)
        log(f"[{done}/{len(todo)}] {name} seed {seed}: val {key} {rec['val'][key]:.4f}, test "
            f"{key} {rec['test'][key]:.4f} ({rec['wall_s']:.0f}s; {time.time() - t0:.0f}s elapsed)")

    if cfg.study.jobs == 1:
        for name, method, ov, seed, path in todo:
            rec = _worker(cfg_dict, ov, method, seed, shared, str(path), cfg.run.threads)
            results[(name, seed)] = rec
            report(name, seed, rec)
        return results
    with ProcessPoolExecutor(cfg.study.jobs, mp_context=get_context("spawn")) as ex:
        futs = {ex.submit(_worker, cfg_dict, ov, method, seed, shared, str(path), cfg.run.threads):
                (name, seed) for name, method, ov, seed, path in todo}
        for f in futs:
            name, seed = futs[f]
            rec = f.result()
            results[(name, seed)] = rec
            report(name, seed, rec)
    return results


# Metrics reported x100 (points); the others (kl_T, nats) as they are.
_POINTS = ("acc", "recall10", "zero_shot", "cos", "probe")


def paired(results: dict, arms: Sequence[str], seeds: Sequence[int], baseline: str, metric: str) -> dict:
    """Per arm: mean test ``metric`` and, against ``baseline``, the mean paired
    difference with its 95% t-interval (accuracies and cosines in points, x100;
    ``kl_T`` in nats)."""
    out = {}
    scale = 100.0 if metric in _POINTS else 1.0
    for a in arms:
        vals = [scale * results[(a, s)]["test"][metric] for s in seeds]
        row = {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
               "per_seed": vals}
        if baseline and a != baseline:
            d = [v - scale * results[(baseline, s)]["test"][metric] for v, s in zip(vals, seeds)]
            m = statistics.fmean(d)
            half = t975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
            row.update(diff=m, lo=m - half, hi=m + half)
        out[a] = row
    return out


def expected_kl_weight(cfg: TextConfig) -> float:
    """CIFD's expected total KL weight per step: ``lam_kl (1 + N lam_rdm)(1 - p_drop)``
    (the teacher and N RDM targets, each kept with probability ``1 - p_drop``)."""
    n = len(cfg.rdm.rates)
    return cfg.kd.lam_kl * (1 + n * cfg.cifd.lam_rdm) * (1 - cfg.cifd.p_drop)


def _resolve_matched(cfg: TextConfig, name: str, method: str, ov: list, done: dict) -> list:
    """``kd.lam_kl=@matched:ARM``: the KL weight that gives this arm the expected KL
    weight of the (earlier, resolved) CIFD arm ARM: for a ``kd`` arm that weight
    itself, for a ``cifd`` arm (e.g. without RDM targets) that weight divided by its
    own ``(1 + N lam_rdm)(1 - p_drop)``."""
    plain = [o for o in ov if not o.partition("=")[2].startswith("@matched")]
    out = list(plain)
    for o in ov:
        if o in plain:
            continue
        key, _, val = o.partition("=")
        ref = val.partition(":")[2]
        if key.strip() != "kd.lam_kl" or ref not in done or done[ref][1] != "cifd":
            raise ConfigError(f"arm {name}: {o!r}: use kd.lam_kl=@matched:ARM with ARM an earlier "
                              f"cifd arm ({', '.join(a for a in done if done[a][1] == 'cifd') or 'none'})")
        target = expected_kl_weight(_arm_cfg(cfg, done[ref][2]))
        lam = target
        if method == "cifd":
            mine = _arm_cfg(cfg, plain + ["kd.lam_kl=1"])
            lam = target / expected_kl_weight(mine)
        out.append(f"kd.lam_kl={lam:.6g}")
    return out


def run_text(cfg: TextConfig, log: Log = _log_default) -> dict:
    """The whole recipe (module docstring); returns and writes ``results.json``."""
    torch.set_num_threads(cfg.run.threads * max(1, cfg.study.jobs))
    t_start = time.time()
    sh = prepare(cfg, log)
    torch.set_num_threads(cfg.run.threads)
    metric = cfg.study.metric or default_metric(cfg.task)
    sweep = [parse_arm(a, cfg.task) for a in cfg.study.sweep]
    arms_raw = [parse_arm(a, cfg.task) for a in cfg.study.arms]
    if not arms_raw:
        raise ConfigError("study.arms: no arms to run")
    for name, method, ov in sweep + [a for a in arms_raw if "@best" not in a[2]]:
        _arm_cfg(cfg, ov)  # bad overrides fail before any run
    sweep_res = run_many(cfg, sh, [(n, m, ov, cfg.study.sweep_seed) for n, m, ov in sweep], log)
    sweep_table = [{"name": n, "method": m, "overrides": ov,
                    "val": sweep_res[(n, cfg.study.sweep_seed)]["val"]} for n, m, ov in sweep]
    arms = []
    for name, method, ov in arms_raw:
        if "@best" in ov:
            cands = [r for r in sweep_table if r["method"] == method]
            if not cands:
                raise ConfigError(f"arm {name}: @best but the sweep has no {method} entry")
            best = max(cands, key=lambda r: r["val"][metric])
            ov = best["overrides"] + [o for o in ov if o != "@best"]
            log(f"{name}: @best = {best['name']} ({' '.join(best['overrides']) or 'base'})")
        ov = _resolve_matched(cfg, name, method, ov, {a[0]: a for a in arms})
        _arm_cfg(cfg, ov)
        arms.append((name, method, ov))
    names = [a[0] for a in arms]
    if cfg.study.baseline and cfg.study.baseline not in names:
        raise ConfigError(f"study.baseline: {cfg.study.baseline!r} is not an arm ({', '.join(names)})")
    final = run_many(cfg, sh, [(n, m, ov, s) for n, m, ov in arms for s in cfg.study.seeds], log)
    metrics = ["recall10", "zero_shot", "cos", "probe"] if cfg.task == "embedding" else ["acc", "kl_T"]
    table = {m: paired(final, names, cfg.study.seeds, cfg.study.baseline, m) for m in metrics}
    res = {"task": cfg.task, "config": dataclasses.asdict(cfg), "teacher": sh["teacher"], "bank": sh["bank"],
           "topics": sh["topics"], "metric": metric, "sweep": sweep_table,
           "arms": [{"name": n, "method": m, "overrides": ov} for n, m, ov in arms],
           "runs": [dict(v, arm=k[0]) for k, v in final.items()], "paired": table,
           "wall_s": time.time() - t_start}
    out = run_dir(cfg) / "results.json"
    atomic_write_text(json.dumps(res, indent=1), out)
    log("\n" + format_table(res))
    try:
        from .plots import plot_text_results
        plot_text_results(res, run_dir(cfg))
    except ImportError:
        log("matplotlib not installed: no plots (pip install -e '.[plot]')")
    log(f"results {out} ({time.time() - t_start:.0f}s)")
    return res


def format_table(res: dict) -> str:
    """The results table: per arm, mean (sd) of each test metric and, against the
    baseline, the paired difference with its 95% interval."""
    metrics = list(res["paired"])
    seeds = len(next(iter(res["paired"][metrics[0]].values()))["per_seed"])
    lines = [f"{res['task']} task, test, {seeds} seed(s); points (x100; kl_T = KL(teacher || student) "
             f"in nats); d = paired difference "
             f"against {res['config']['study']['baseline'] or '-'} with its 95% interval"]
    head = f"{'arm':<14}" + "".join(f"{m:>33}" for m in metrics)
    lines.append(head)
    for arm in res["paired"][metrics[0]]:
        cells = []
        for m in metrics:
            r = res["paired"][m][arm]
            c = f"{r['mean']:.2f}"
            if "diff" in r:
                c += f" d {r['diff']:+.2f} [{r['lo']:+.2f},{r['hi']:+.2f}]"
            cells.append(f"{c:>33}")
        lines.append(f"{arm:<14}" + "".join(cells))
    t = res["teacher"]
    tl = f"teacher ({t['params'] / 1e6:.1f}M params): zero-shot {100 * t['zero_shot_test']:.2f}, " \
         f"probe {100 * t['probe_test']:.2f}"
    if "test_acc" in t:
        tl += f", head acc {100 * t['test_acc']:.2f}"
    lines.append(tl)
    runs = res["runs"]
    if runs:
        lines.append(f"student: {runs[0]['params'] / 1e6:.2f}M params at inference "
                     f"({100 * runs[0]['params'] / t['params']:.1f}% of the teacher)")
    b = res["bank"]["test"]
    lines.append("RDMs (test): " + ", ".join(
        f"R={R:g}: dist {d:.3f} rate {r:.1f} bits" + (f" acc {100 * a:.2f}" if "acc" in b else "")
        for R, d, r, a in zip(res["bank"]["R"], b["dist"], b["rate_bits"], b.get("acc", b["dist"]))))
    return "\n".join(lines)
