# SPDX-License-Identifier: Apache-2.0
"""``CIFDLoss`` and ``CIFDEmbeddingLoss``: the stage-2 student losses as modules
holding their hyperparameters (docs/METHOD.md section 4).

KD-dropout is a training-time regulariser: in ``train()`` mode the keep flags are
drawn with ``p_drop`` (one Philox draw of M flags per call, i.e. per step); in
``eval()`` mode every target is kept (``p_drop`` = 0), like ``nn.Dropout``.

Hyperparameters are validated in the constructors (:mod:`cifd_kernels.reference._checks`;
TypeError for a wrong type, bool included, ValueError naming the argument, the
class and, in ``lam``, the element): ``tau``, ``temperature`` finite and > 0;
``p_drop`` in [0, 1) (1 would drop every target at every step: KD switched off
for good, not a setting; the functionals accept it as a degenerate call); every
weight (each ``lam_m``, ``lam_ce``, ``lam_kl``, ``w_emb``, ``lam_I``, ``lam_cl``)
finite and >= 0: the loss is minimised, so a negative weight would reward the
distance it names, and 0 switches a term off; ``lam`` non-empty (its length must
be M, the number of targets, which only the forward sees: a mismatch raises there).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .. import backend as _backend
from ..ops import cifd_loss as _ops
from ..reference import _checks
from ..reference import cifd_loss as _ref
from ..reference.philox import draw_seed

__all__ = ["CIFDLoss", "CIFDEmbeddingLoss"]


def _lam(lam, where: str) -> Optional[tuple[float, ...]]:
    """M >= 1 target weights (teacher first), each finite and >= 0, or None."""
    if lam is None:
        return None
    return _checks.check_sequence("lam", lam, _checks.check_finite_nonneg, where)


def _dropout_args(module: nn.Module, seed: Optional[int]) -> tuple[float, int]:
    """KD-dropout for this call: ``(p_drop, seed)``; a seed is drawn only when dropout
    is on (training mode, ``p_drop > 0``) and none was given; off, p_drop is 0."""
    if module.training and module.p_drop > 0:
        return module.p_drop, draw_seed() if seed is None else seed
    return 0.0, 0 if seed is None else seed


class CIFDLoss(nn.Module):
    """Stage-2 CIFD student loss (:func:`cifd_kernels.reference.cifd_loss.cifd_loss`).

    Defaults are the paper's CIFAR-100 settings: ``lam_ce = lam_kl = 1``, every
    ``lam_m = 1``, ``p_drop = 0.25``, ``tau = 2``, ``w_emb = 100``, ``lam_I = 0.005``,
    MSE distortion (ImageNet: ``dist="smooth_l1"``, ``lam_I = 0.001``).

    ``w_emb`` is in the paper's units: a weight on the embedding distortion's **mean**
    over the D features (``F.mse_loss``), so ``w_emb = 100`` is the paper's
    (docs/METHOD.md section 4). The module calls the functional, whose ``w_emb``
    weighs the per-sample *sum*, with ``w_emb / D`` (D from ``student_emb``).

    Args:
        lam: M target weights, teacher first, each finite and >= 0 (None = all ones,
            M taken from the inputs; a length other than M raises in the forward).
        tau: KD temperature, finite and > 0; the KL is scaled by ``tau^2``.
        p_drop: KD-dropout probability per target per step (training mode only), in [0, 1).
        lam_ce, lam_kl, w_emb, lam_I: term weights, finite and >= 0 (``w_emb`` on the
            mean over D, see above).
        dist: ``"mse"`` | ``"smooth_l1"``.
        ignore_index: label value left out of CE (an int).
        backend: ``auto|cuda|triton|cpu|reference``: the fused kernels of
            :func:`cifd_kernels.ops.cifd_loss.cifd_loss` where they apply (auto falls
            back to the reference for float64 or targets requiring grad), else the reference.
    """

    def __init__(self, lam: Optional[Sequence[float]] = None, tau: float = 2.0, p_drop: float = 0.25,
                 lam_ce: float = 1.0, lam_kl: float = 1.0, w_emb: float = 100.0, lam_I: float = 0.005,
                 dist: str = "mse", ignore_index: int = -100, backend: Optional[str] = None):
        super().__init__()
        where = type(self).__name__
        self.lam = _lam(lam, where)
        self.tau = _checks.check_positive("tau", tau, where)
        self.p_drop = _checks.check_prob("p_drop", p_drop, where)
        self.lam_ce = _checks.check_finite_nonneg("lam_ce", lam_ce, where)
        self.lam_kl = _checks.check_finite_nonneg("lam_kl", lam_kl, where)
        self.w_emb = _checks.check_finite_nonneg("w_emb", w_emb, where)
        self.lam_I = _checks.check_finite_nonneg("lam_I", lam_I, where)
        self.dist = _ref.check_dist(dist, where)
        self.ignore_index = _checks.check_int("ignore_index", ignore_index, where, lo=None)
        self.backend = None if backend is None else _backend.check_backend_name(backend)

    def forward(self, student_logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor,
                student_emb: Optional[torch.Tensor] = None, target_embs: Optional[torch.Tensor] = None,
                ibm_rate: Optional[torch.Tensor] = None, seed: Optional[int] = None, offset: int = 0):
        """Args:
            student_logits: ``[B, K]``;
            target_logits: ``[M, B, K]`` teacher first, then the N frozen RDMs;
            labels: ``[B]`` integer (same order as the functional: student, targets, labels);
            student_emb: ``[B, D]`` post-IBM embedding U, or None;
            target_embs: ``[M, B, D]`` teacher X first, then the RDMs' Xh_n, or None;
            ibm_rate: ``[B]`` IBM rate in nats, or None;
            seed, offset: Philox seed/counter of the keep flags (training mode);
                seed None draws one. A call consumes M counters.

        Returns ``(loss, terms)`` (see the functional). An empty batch raises ValueError.
        """
        p_drop, seed = _dropout_args(self, seed)
        # The paper's units (mean over D) -> the functional's (per-sample sum). D is a
        # shape, a Python int: no host sync. Without embeddings the weight is unused.
        w_emb = self.w_emb / student_emb.shape[-1] if student_emb is not None and student_emb.dim() >= 1 \
            and student_emb.shape[-1] > 0 else self.w_emb
        return _ops.cifd_loss(student_logits, target_logits, labels, student_emb, target_embs, self.lam,
                              tau=self.tau, p_drop=p_drop, seed=seed, offset=offset, lam_ce=self.lam_ce,
                              lam_kl=self.lam_kl, w_emb=w_emb, dist=self.dist, ibm_rate=ibm_rate,
                              lam_I=self.lam_I, ignore_index=self.ignore_index, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"lam={self.lam}, tau={self.tau}, p_drop={self.p_drop}, lam_ce={self.lam_ce}, "
                f"lam_kl={self.lam_kl}, w_emb={self.w_emb}, lam_I={self.lam_I}, dist={self.dist}")


class CIFDEmbeddingLoss(nn.Module):
    """Embedding-only CIFD loss, the paper's CLIP setting
    (:func:`cifd_kernels.reference.cifd_loss.cifd_embedding_loss`)::

        L = w_emb * sum_m lam_m k_m dist(U, X_m) + lam_I rate_I + lam_cl InfoNCE(U, contrast_emb)

    Defaults: ``w_emb = 1``, ``p_drop = 0`` (the paper's formula has no KD-dropout
    here), ``lam_cl = 0.005`` (paper), ``lam_I = 0.005`` (the paper gives no CLIP
    value; CIFAR's), InfoNCE temperature 0.07 (CLIP's initial value), symmetric.
    Validated as :class:`CIFDLoss`: ``lam`` and the weights ``w_emb``, ``lam_I``,
    ``lam_cl`` finite and >= 0, ``p_drop`` in [0, 1), ``temperature`` finite and > 0.
    """

    def __init__(self, lam: Optional[Sequence[float]] = None, dist: str = "mse", w_emb: float = 1.0,
                 p_drop: float = 0.0, lam_I: float = 0.005, lam_cl: float = 0.005,
                 temperature: float = 0.07, backend: Optional[str] = None):
        super().__init__()
        where = type(self).__name__
        self.lam = _lam(lam, where)
        self.dist = _ref.check_dist(dist, where)
        self.w_emb = _checks.check_finite_nonneg("w_emb", w_emb, where)
        self.p_drop = _checks.check_prob("p_drop", p_drop, where)
        self.lam_I = _checks.check_finite_nonneg("lam_I", lam_I, where)
        self.lam_cl = _checks.check_finite_nonneg("lam_cl", lam_cl, where)
        self.temperature = _checks.check_positive("temperature", temperature, where)
        self.backend = None if backend is None else _backend.check_backend_name(backend)

    def forward(self, student_emb: torch.Tensor, target_embs: torch.Tensor,
                contrast_emb: Optional[torch.Tensor] = None, ibm_rate: Optional[torch.Tensor] = None,
                seed: Optional[int] = None, offset: int = 0):
        """student_emb ``[B, D]`` (post-IBM U), target_embs ``[M, B, D]`` (teacher first),
        contrast_emb ``[B, D]`` the embeddings InfoNCE pairs U with (required when
        ``lam_cl != 0``), ibm_rate ``[B]`` nats or None. Returns ``(loss, terms)``."""
        p_drop, seed = _dropout_args(self, seed)
        return _ops.cifd_embedding_loss(student_emb, target_embs, contrast_emb, self.lam, dist=self.dist,
                                        w_emb=self.w_emb, p_drop=p_drop, seed=seed, offset=offset,
                                        ibm_rate=ibm_rate, lam_I=self.lam_I, lam_cl=self.lam_cl,
                                        temperature=self.temperature, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"lam={self.lam}, dist={self.dist}, w_emb={self.w_emb}, p_drop={self.p_drop}, "
                f"lam_I={self.lam_I}, lam_cl={self.lam_cl}, temperature={self.temperature}")
