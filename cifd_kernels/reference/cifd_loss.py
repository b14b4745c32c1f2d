# SPDX-License-Identifier: Apache-2.0
"""Eager reference of the CIFD losses (docs/METHOD.md sections 2 and 4).

Building blocks, each per sample (no reduction), fp32 math inside whatever the
input dtype (float64 stays float64, so ``gradcheck`` runs on it):

* :func:`distortion` ``dist(a, b)``: sum over the last (feature) dim of squared
  error (``"mse"``) or of smooth-L1 with beta = 1 (``"smooth_l1"``). -> ``[*]``
* :func:`kl_tau` ``tau^2 * KL(softmax(v_T/tau) || softmax(v_S/tau))``: scaled by
  ``tau^2`` (Hinton's convention; the paper does not say). -> ``[*]``
* :func:`cross_entropy`: per-sample CE in nats, 0 where ``labels == ignore_index``.
* :func:`info_nce`: symmetric (CLIP-style) InfoNCE on L2-normalised embeddings.

and the stage-2 student losses :func:`cifd_loss` (logits + embeddings + IBM rate,
with KD-dropout) and :func:`cifd_embedding_loss` (embedding-only, CLIP setting).

Batch reductions are means over the batch of per-sample quantities; CE is the
mean over the samples whose label is not ``ignore_index`` (0 if there are none),
as ``torch.nn.functional.cross_entropy`` does. An empty batch (B = 0) is an
error in the losses (a mean over nothing is undefined and would silently turn
into NaN); the per-sample functions return empty tensors for it.

Nothing here syncs with the host: checks read shapes, dtypes and devices only.
Label values are not range-checked here (that would need a sync);
``cross_entropy`` raises on the CPU and asserts on CUDA for out-of-range labels.

Hyperparameters are checked where they enter, with :mod:`._checks` (TypeError for
a non-number, bool included; ValueError naming the argument and the function):
``tau``, ``temperature`` finite and > 0; ``p_drop`` in [0, 1] (1 drops every
target: a well-defined call, used to pin KD-dropout's semantics; the modules,
which hold it as a training setting, require [0, 1)); every term weight
(``lam_ce``, ``lam_kl``, ``w_emb``, ``lam_I``, ``lam_cl`` and each ``lam_m``) finite
and >= 0: the loss is minimised, so a negative weight would reward the distance it
names, and 0 switches a term off. ``lam`` as a tensor is checked for shape only.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import _checks
from ._checks import check_dim, check_nonempty, check_same_device, check_tensor
from .philox import philox_keep_mask

DISTORTIONS = ("mse", "smooth_l1")

__all__ = [
    "DISTORTIONS", "compute_dtype", "distortion", "kl_tau", "cross_entropy", "info_nce",
    "kd_keep_flags", "cifd_loss", "cifd_embedding_loss",
]


# ----------------------------------------------------------------------------- checks
# The losses' hyperparameters (the tensor checks are in ._checks). Metadata only (no sync).

def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32: the dtype the math runs in."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def check_tau(tau: float, name: str = "tau", where: Optional[str] = None) -> float:
    """A temperature: finite and > 0."""
    return _checks.check_positive(name, tau, where)


def check_prob(p: float, name: str = "p_drop", where: Optional[str] = None) -> float:
    """A KD-dropout probability as the functions take it: in [0, 1] (1 drops every
    target, a well-defined call; the modules require [0, 1))."""
    return _checks.check_prob(name, p, where, hi_closed=True)


def check_dist(kind: str, where: Optional[str] = None) -> str:
    return _checks.check_choice("dist", kind, DISTORTIONS, where)


def check_weights(where: Optional[str] = None, **weights: float) -> None:
    """Each keyword a loss term's weight: finite and >= 0 (0 switches the term off;
    a negative weight would reward the distance the term measures)."""
    for name, v in weights.items():
        _checks.check_finite_nonneg(name, v, where)


def check_loss_hparams(where: Optional[str] = None, *, tau: float, p_drop: float, dist: str,
                       ignore_index: int, **weights: float) -> None:
    """The scalar hyperparameters of :func:`cifd_loss` (also checked by the ops)."""
    check_tau(tau, where=where)
    check_prob(p_drop, where=where)
    check_dist(dist, where)
    _checks.check_int("ignore_index", ignore_index, where, lo=None)
    check_weights(where, **weights)


def check_embedding_loss_hparams(where: Optional[str] = None, *, p_drop: float, dist: str,
                                 temperature: float, **weights: float) -> None:
    """The scalar hyperparameters of :func:`cifd_embedding_loss` (also checked by the ops)."""
    check_prob(p_drop, where=where)
    check_dist(dist, where)
    check_tau(temperature, "temperature", where)
    check_weights(where, **weights)


def _up(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


# ----------------------------------------------------------------------------- per sample

def distortion(a: torch.Tensor, b: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Per-sample distortion ``dist(a, b)``: SUM over the last dim (features).

    a, b: ``[*, D]`` floating, broadcastable (e.g. ``[B, D]`` against ``[M, B, D]``).
    kind: ``"mse"`` -> sum of ``(a - b)^2``; ``"smooth_l1"`` -> sum of the Huber
    form with beta = 1 (``0.5 d^2`` if ``|d| < 1`` else ``|d| - 0.5``).
    Returns ``[*]`` (the broadcast leading shape) in fp32 (float64 for float64 inputs).
    """
    check_tensor("a", a)
    check_tensor("b", b)
    check_dist(kind)
    if a.dim() < 1 or b.dim() < 1:
        raise ValueError(f"a and b need a feature dim, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    check_same_device("a", a, b=b)
    check_dim("b", b.shape[-1], a.shape[-1], "the feature dim (last)")
    try:
        torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} do not broadcast") from None
    dt = compute_dtype(a, b)
    d = _up(a, dt) - _up(b, dt)
    if kind == "mse":
        e = d * d
    else:
        ad = d.abs()
        e = torch.where(ad < 1.0, 0.5 * d * d, ad - 0.5)
    return e.sum(-1)


def kl_tau(teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """``tau^2 * KL(p_T || p_S)`` per sample, ``p = softmax(v / tau)`` over the last dim.

    Argument order: TEACHER (target) first, student second. The KL is scaled by
    ``tau^2`` (Hinton's convention, so gradients keep their size as tau changes).
    teacher_logits, student_logits: ``[*, K]`` broadcastable, finite. Returns
    ``[*]`` in nats, fp32 (float64 for float64 inputs).
    """
    check_tensor("teacher_logits", teacher_logits)
    check_tensor("student_logits", student_logits)
    check_tau(tau, where="kl_tau")
    if teacher_logits.dim() < 1 or student_logits.dim() < 1:
        raise ValueError("teacher_logits and student_logits need a class dim")
    check_same_device("student_logits", student_logits, teacher_logits=teacher_logits)
    check_dim("teacher_logits", teacher_logits.shape[-1], student_logits.shape[-1],
              "the class dim K (last)")
    try:
        torch.broadcast_shapes(teacher_logits.shape, student_logits.shape)
    except RuntimeError:
        raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} and student_logits "
                         f"{tuple(student_logits.shape)} do not broadcast") from None
    dt = compute_dtype(teacher_logits, student_logits)
    log_pt = torch.log_softmax(_up(teacher_logits, dt) / tau, dim=-1)
    log_ps = torch.log_softmax(_up(student_logits, dt) / tau, dim=-1)
    return (tau * tau) * (log_pt.exp() * (log_pt - log_ps)).sum(-1)


def check_labels(labels: torch.Tensor, k: int, ignore_index: int) -> None:
    """IndexError naming ``labels`` unless each is a class in ``[0, k)`` or ``ignore_index``
    (the message of every backend, the C++ kernels' included). Reads the labels: for CPU
    tensors only (on a GPU the kernels and F.cross_entropy assert on the device)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= k))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise IndexError(f"labels[{i}] = {int(labels[i])} is out of bounds for K = {k} classes "
                         f"(expected 0 <= label < {k}, or ignore_index = {ignore_index})")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-sample cross-entropy in nats. logits ``[B, K]`` floating, labels ``[B]``
    integer, each in ``[0, K)`` or ``ignore_index`` (:func:`check_labels` on CPU tensors).
    Returns ``[B]``, 0 where ``labels == ignore_index``."""
    check_tensor("logits", logits, ndim=2)
    check_tensor("labels", labels, ndim=1, integer=True)
    check_same_device("logits", logits, labels=labels)
    check_dim("labels", labels.shape[0], logits.shape[0], "the batch size B")
    # On a GPU F.cross_entropy's device assert (no host sync); while tracing, the graph's.
    if labels.device.type == "cpu" and type(labels) is torch.Tensor and not torch.compiler.is_compiling():
        check_labels(labels, logits.shape[1], ignore_index)
    dt = compute_dtype(logits)
    return F.cross_entropy(_up(logits, dt), labels.long(), ignore_index=ignore_index, reduction="none")


def _ce_mean(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean CE over non-ignored samples (0 if all are ignored), without a device sync."""
    ce = cross_entropy(logits, labels, ignore_index)
    n = (labels != ignore_index).sum().clamp_min(1).to(ce.dtype)
    return ce.sum() / n


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's loss) per sample, on L2-normalised embeddings.

    a, b: ``[B, D]``; row i of ``a`` and row i of ``b`` are the positive pair, the
    other rows of the batch the negatives. With ``a_n = a/|a|``, ``b_n = b/|b|``
    and ``S = a_n b_n^T / temperature`` (``[B, B]``), the loss of sample i is
    ``(CE(S[i, :], i) + CE(S[:, i], i)) / 2`` (a->b and b->a directions averaged,
    as CLIP does). The project chose the symmetric form because the paper's CLIP
    setting distils an embedding that serves both retrieval directions.
    ``temperature`` > 0 (default 0.07, CLIP's initial value). Returns ``[B]``, fp32.
    Norms are clamped below at 1e-12 (``F.normalize``'s rule).
    """
    check_tensor("a", a, ndim=2)
    check_tensor("b", b, ndim=2)
    check_tau(temperature, "temperature", "info_nce")
    check_same_device("a", a, b=b)
    check_dim("b", b.shape[0], a.shape[0], "the batch size B")
    check_dim("b", b.shape[1], a.shape[1], "the embedding dim D")
    dt = compute_dtype(a, b)
    an = F.normalize(_up(a, dt), dim=-1)
    bn = F.normalize(_up(b, dt), dim=-1)
    s = an @ bn.t() / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(s, target, reduction="none")
                  + F.cross_entropy(s.t(), target, reduction="none"))


# ----------------------------------------------------------------------------- stage 2

def kd_keep_flags(m: int, seed: int, offset: int, p_drop: float, device=None) -> torch.Tensor:
    """KD-dropout keep flags ``k_0..k_{M-1}`` (bool ``[M]``): ``philox_keep_mask((M,),
    seed, offset, p_drop)``, i.e. word 1 of Philox counters ``offset .. offset+M-1``.

    Drawn once per training step and shared by the whole batch (the paper drops a
    target "each step"): flag m switches off both the KL and the embedding term of
    target m (m = 0 the teacher, m >= 1 the RDMs).
    """
    check_prob(p_drop, where="kd_keep_flags")
    return philox_keep_mask((m,), seed, offset, p_drop, device=device)


def _check_lam(lam, m: int, device, dt, where: Optional[str] = None) -> torch.Tensor:
    """``lam`` as an ``[M]`` tensor: None -> ones; a tensor is checked for shape, dtype
    and device only (its values would need a host read); a sequence must hold M
    finite weights >= 0."""
    if lam is None:
        return torch.ones(m, dtype=dt, device=device)
    if isinstance(lam, torch.Tensor):
        if lam.dim() != 1 or lam.shape[0] != m:
            raise ValueError(f"lam must have shape [M] = [{m}] (teacher first, then the RDMs), "
                             f"got {tuple(lam.shape)}")
        check_tensor("lam", lam)
        if lam.device != device:
            raise ValueError(f"lam is on {lam.device} but the logits are on {device}")
        return _up(lam, dt)
    if isinstance(lam, (str, bytes)) or not isinstance(lam, Sequence):
        raise TypeError(f"lam must be a sequence of numbers, a tensor or None, got {type(lam).__name__}"
                        f"{_checks._at(where)}")
    if len(lam) != m:
        raise ValueError(f"lam must have M = {m} weights (teacher first, then the RDMs), got {len(lam)}"
                         f"{_checks._at(where)}")
    lam = _checks.check_sequence("lam", lam, _checks.check_finite_nonneg, where)
    return torch.tensor(lam, dtype=dt, device=device)


def _check_rate(ibm_rate, batch: int, ref_name: str, ref: torch.Tensor) -> None:
    if ibm_rate is None:
        return
    check_tensor("ibm_rate", ibm_rate, ndim=1)
    check_same_device(ref_name, ref, ibm_rate=ibm_rate)
    check_dim("ibm_rate", ibm_rate.shape[0], batch, "the batch size B")


def _check_embeddings(student_emb, target_embs, m: int, batch: int, ref_name, ref) -> None:
    check_tensor("student_emb", student_emb, ndim=2)
    check_tensor("target_embs", target_embs, ndim=3)
    check_same_device(ref_name, ref, student_emb=student_emb, target_embs=target_embs)
    check_dim("student_emb", student_emb.shape[0], batch, "the batch size B")
    check_dim("target_embs", target_embs.shape[0], m, "the number of targets M")
    check_dim("target_embs", target_embs.shape[1], batch, "the batch size B")
    check_dim("target_embs", target_embs.shape[2], student_emb.shape[1], "the embedding dim D")


def _embedding_terms(student_emb, target_embs, dist: str) -> torch.Tensor:
    return distortion(student_emb.unsqueeze(0), target_embs, dist).mean(-1)  # [M]


def _drop_rows(keep: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Zero the rows of dropped targets (``t`` ``[M, ...]``) before any math, so a
    dropped target's values (even NaN/inf) reach neither the loss nor any gradient,
    as in a kernel that skips it."""
    return torch.where(keep.reshape((-1,) + (1,) * (t.dim() - 1)), t, torch.zeros((), dtype=t.dtype,
                                                                                 device=t.device))


def _kept(keep: torch.Tensor, per_target: torch.Tensor, zero_m: torch.Tensor) -> torch.Tensor:
    # where(), not a multiply: the dropped rows' (finite) values get no gradient either.
    return torch.where(keep, _up(per_target, zero_m.dtype), zero_m)


def check_loss_args(student_logits, target_logits, labels, student_emb, target_embs, ibm_rate,
                    **hparams) -> tuple[int, int, int]:
    """The arguments of :func:`cifd_loss` but ``lam``, seed and offset, checked alike on
    every backend (the ops call this too); returns ``(B, K, M)``."""
    check_tensor("student_logits", student_logits, ndim=2)
    check_tensor("target_logits", target_logits, ndim=3)
    check_tensor("labels", labels, ndim=1, integer=True)
    check_loss_hparams("cifd_loss", **hparams)
    ref = student_logits
    check_same_device("student_logits", ref, target_logits=target_logits, labels=labels)
    batch, k = student_logits.shape
    m = target_logits.shape[0]
    check_dim("target_logits", target_logits.shape[1], batch, "the batch size B")
    check_dim("target_logits", target_logits.shape[2], k, "the class count K")
    check_dim("labels", labels.shape[0], batch, "the batch size B")
    if m == 0:
        raise ValueError("target_logits has M = 0 targets; the teacher comes first")
    if (student_emb is None) != (target_embs is None):
        raise ValueError("student_emb and target_embs go together: pass both or neither")
    if student_emb is not None:
        _check_embeddings(student_emb, target_embs, m, batch, "student_logits", ref)
    _check_rate(ibm_rate, batch, "student_logits", ref)
    check_nonempty("student_logits", batch)
    return batch, k, m


def cifd_loss(student_logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor,
              student_emb: Optional[torch.Tensor] = None, target_embs: Optional[torch.Tensor] = None,
              lam: Union[Sequence[float], torch.Tensor, None] = None, *, tau: float = 2.0,
              p_drop: float = 0.25, seed: int = 0, offset: int = 0, lam_ce: float = 1.0,
              lam_kl: float = 1.0, w_emb: float = 100.0, dist: str = "mse",
              ibm_rate: Optional[torch.Tensor] = None, lam_I: float = 0.005,
              ignore_index: int = -100):
    """Stage-2 CIFD student loss (docs/METHOD.md section 4), batch mean::

        L = lam_ce * CE(y, V_S)
          + lam_kl * sum_m lam_m k_m tau^2 KL(p(V_m) || p(V_S))
          + w_emb  * sum_m lam_m k_m dist(U, X_m)
          + lam_I  * rate_I

    Targets are indexed m = 0..M-1: m = 0 the teacher (``lam[0]`` is its weight,
    1 in the paper), m >= 1 the N = M-1 frozen RDMs.

    Args:
        student_logits: ``[B, K]`` floating, student logits ``V_S``.
        target_logits: ``[M, B, K]`` floating, teacher logits first, then RDM logits.
        labels: ``[B]`` integer class indices; ``ignore_index`` entries drop out of CE.
        student_emb: ``[B, D]`` post-IBM student embedding ``U``, or None (then
            ``target_embs`` must be None too and the embedding term is 0).
        target_embs: ``[M, B, D]``: teacher embedding ``X`` first, then ``Xh_n``.
        lam: ``[M]`` target weights, finite and >= 0 (sequence or tensor; None = all
            ones; a tensor is checked for shape only).
        tau: KD temperature, finite and > 0. KL is scaled by ``tau^2``.
        p_drop: KD-dropout probability in [0, 1]. Keep flags
            ``k = philox_keep_mask((M,), seed, offset, p_drop)``, drawn once per
            step for the whole batch (:func:`kd_keep_flags`). A dropped target
            contributes exactly nothing: its rows are zeroed (``torch.where``)
            before the math and its terms after, so neither the loss nor any
            gradient depends on its values (not even NaN/inf), as in a kernel
            that skips it.
            Pass ``p_drop = 0`` at evaluation.
        seed, offset: Philox seed / counter offset for the keep flags (Python ints).
        lam_ce, lam_kl, w_emb, lam_I: term weights, finite and >= 0 (paper CIFAR-100:
            1, 1, 100, 0.005).
        dist: ``"mse"`` or ``"smooth_l1"`` for the embedding distortion (sum over D).
        ibm_rate: ``[B]`` IBM rate ``rate_I`` in nats per sample, or None (term 0).
        ignore_index: label value excluded from CE.

    Returns:
        ``(loss, terms)``: ``loss`` a 0-dim fp32 tensor (float64 for float64 inputs);
        ``terms`` a dict of tensors: ``ce`` (batch-mean CE), ``kl`` ``[M]``
        (batch-mean ``tau^2 KL`` per target, before the ``lam`` weights; 0 for a
        dropped target), ``emb`` ``[M]`` (batch-mean distortion per target, before
        ``lam``; 0 for a dropped target, zeros without embeddings), ``keep``
        ``[M]`` bool, ``rate`` (batch-mean ``rate_I``, 0 without it), ``loss``.

    An empty batch (B = 0) raises ValueError.
    """
    batch, k, m = check_loss_args(student_logits, target_logits, labels, student_emb, target_embs,
                                  ibm_rate, tau=tau, p_drop=p_drop, dist=dist, ignore_index=ignore_index,
                                  lam_ce=lam_ce, lam_kl=lam_kl, w_emb=w_emb, lam_I=lam_I)
    ref = student_logits

    dt = compute_dtype(student_logits, target_logits, student_emb, target_embs, ibm_rate)
    lam_t = _check_lam(lam, m, ref.device, dt, "cifd_loss")
    keep = kd_keep_flags(m, seed, offset, p_drop, device=ref.device)

    ce = _ce_mean(student_logits, labels, ignore_index)
    zero_m = torch.zeros(m, dtype=dt, device=ref.device)
    kl = kl_tau(_drop_rows(keep, target_logits), student_logits.unsqueeze(0), tau).mean(-1)
    kl = _kept(keep, kl, zero_m)
    kl_term = (lam_t * kl).sum()
    if student_emb is not None:
        emb = _kept(keep, _embedding_terms(student_emb, _drop_rows(keep, target_embs), dist), zero_m)
        emb_term = (lam_t * emb).sum()
    else:
        emb = zero_m
        emb_term = zero_m.sum()
    rate = _up(ibm_rate, dt).mean() if ibm_rate is not None else zero_m.sum()
    loss = lam_ce * _up(ce, dt) + lam_kl * kl_term + w_emb * emb_term + lam_I * rate
    terms = {"ce": ce, "kl": kl, "emb": emb, "keep": keep, "rate": rate, "loss": loss}
    return loss, terms


def check_embedding_loss_args(student_emb, target_embs, contrast_emb, ibm_rate,
                              **hparams) -> tuple[int, int]:
    """The arguments of :func:`cifd_embedding_loss` but ``lam``, seed and offset, checked
    alike on every backend (the ops call this too); returns ``(B, M)``."""
    check_tensor("student_emb", student_emb, ndim=2)
    check_tensor("target_embs", target_embs, ndim=3)
    check_embedding_loss_hparams("cifd_embedding_loss", **hparams)
    batch = student_emb.shape[0]
    m = target_embs.shape[0]
    if m == 0:
        raise ValueError("target_embs has M = 0 targets; the teacher comes first")
    ref = student_emb
    _check_rate(ibm_rate, batch, "student_emb", ref)
    if hparams["lam_cl"] != 0:
        if contrast_emb is None:
            raise ValueError("contrast_emb is required when lam_cl != 0 (the embeddings "
                             "InfoNCE pairs student_emb with)")
        check_tensor("contrast_emb", contrast_emb, ndim=2)
        check_same_device("student_emb", ref, contrast_emb=contrast_emb)
        check_dim("contrast_emb", contrast_emb.shape[0], batch, "the batch size B")
        check_dim("contrast_emb", contrast_emb.shape[1], student_emb.shape[1], "the embedding dim D")
    _check_embeddings(student_emb, target_embs, m, batch, "student_emb", ref)
    check_nonempty("student_emb", batch)
    return batch, m


def cifd_embedding_loss(student_emb: torch.Tensor, target_embs: torch.Tensor,
                        contrast_emb: Optional[torch.Tensor] = None,
                        lam: Union[Sequence[float], torch.Tensor, None] = None, *,
                        dist: str = "mse", w_emb: float = 1.0, p_drop: float = 0.0,
                        seed: int = 0, offset: int = 0, ibm_rate: Optional[torch.Tensor] = None,
                        lam_I: float = 0.005, lam_cl: float = 0.005,
                        temperature: float = 0.07):
    """Embedding-only CIFD loss (the paper's CLIP setting, no logits), batch mean::

        L = w_emb * sum_m lam_m k_m dist(U, X_m) + lam_I * rate_I
          + lam_cl * InfoNCE(U, contrast_emb)

    With the defaults (``w_emb = 1``, ``p_drop = 0`` so every ``k_m = 1``) this is
    docs/METHOD.md's ``dist(U, X) + sum_n lam_n dist(U, Xh_n) + lam_I rate_I``
    plus ``lam_cl`` InfoNCE; KD-dropout is available as in :func:`cifd_loss`.

    Args:
        student_emb: ``[B, D]`` post-IBM student embedding ``U``.
        target_embs: ``[M, B, D]``: teacher embedding first, then the RDMs' ``Xh_n``.
        contrast_emb: ``[B, D]`` the embeddings InfoNCE pairs ``U`` with, row i the
            positive of row i (e.g. the paired text embeddings, or the teacher's
            image embeddings ``target_embs[0]``). The caller chooses; it is required
            when ``lam_cl != 0`` and ignored when ``lam_cl == 0``.
        lam: ``[M]`` target weights, finite and >= 0 (None = all ones).
        temperature: InfoNCE temperature, finite and > 0 (:func:`info_nce`, symmetric,
            L2-normalised); checked even when ``lam_cl == 0``.
        w_emb, lam_I, lam_cl: term weights, finite and >= 0.
        Others as in :func:`cifd_loss`.

    Returns ``(loss, terms)`` with terms ``emb`` ``[M]``, ``keep`` ``[M]``, ``rate``,
    ``nce`` (batch-mean InfoNCE, 0 when ``lam_cl == 0``), ``loss``.
    An empty batch (B = 0) raises ValueError.
    """
    batch, m = check_embedding_loss_args(student_emb, target_embs, contrast_emb, ibm_rate, p_drop=p_drop,
                                         dist=dist, temperature=temperature, w_emb=w_emb, lam_I=lam_I,
                                         lam_cl=lam_cl)
    ref = student_emb

    dt = compute_dtype(student_emb, target_embs, contrast_emb, ibm_rate)
    lam_t = _check_lam(lam, m, ref.device, dt, "cifd_embedding_loss")
    keep = kd_keep_flags(m, seed, offset, p_drop, device=ref.device)
    zero_m = torch.zeros(m, dtype=dt, device=ref.device)
    emb = _kept(keep, _embedding_terms(student_emb, _drop_rows(keep, target_embs), dist), zero_m)
    emb_term = (lam_t * emb).sum()
    rate = _up(ibm_rate, dt).mean() if ibm_rate is not None else zero_m.sum()
    nce = info_nce(student_emb, contrast_emb, temperature).mean() if lam_cl != 0 else zero_m.sum()
    loss = w_emb * emb_term + lam_I * rate + lam_cl * _up(nce, dt)
    terms = {"emb": emb, "keep": keep, "rate": rate, "nce": nce, "loss": loss}
    return loss, terms
