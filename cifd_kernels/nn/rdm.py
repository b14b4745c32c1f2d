# SPDX-License-Identifier: Apache-2.0
"""``RDM`` and ``RDMBank``: Rate-Distortion Modules (docs/METHOD.md section 2).

An :class:`RDMBank` holds N independent RDMs in stacked parameters and trains
them in one pass (stage 1); frozen (``eval()``), it gives the RDM targets for
the student (stage 2). :class:`RDM` is the N = 1 case with an ``nn.Linear``
state dict. ``RDMBank.from_rdms`` / ``RDMBank.split`` convert exactly between
the two.

State dicts::

    RDM      enc1.weight [H, D]     enc1.bias [H]     (nn.Linear)
             enc2.weight [L, H]     enc2.bias [L]
             dec1.weight [H, L]     dec1.bias [H]
             dec2.weight [D, H]     dec2.bias [D]
             head.weight [K, D]     head.bias [K]     (absent when K = 0)
             entropy_bottleneck.*   (EntropyBottleneck(L), CompressAI layout)
    RDMBank  the same names with a leading N dim (enc1.weight [N, H, D], ...);
             entropy_bottleneck.* is ONE EntropyBottleneck(N * L): channel
             n * L + l is latent l of RDM n.

Head-less RDMs (``K = 0``, the paper's CLIP setting, docs/METHOD.md end of section
4): no head (``module.head`` is None, no ``head.*`` in the state dict), ``logits``
an empty ``[N, B, 0]``, and the stage-1 loss ``R * dist(X, Xh) + rate`` alone
(terms ``ce`` and ``kl`` zeros); labels or teacher logits raise ValueError naming
them, on every backend. ``lam_ce``, ``lam_kl``, ``tau`` and ``ignore_index`` are
still validated and kept (they then weigh nothing).

The distortion weights ``R`` are hyperparameters, not state (``module.R``, a
tuple; the math reads a non-persistent buffer ``R_tensor`` [N] that follows
``.to()``).

Hyperparameters are validated in the constructors (:mod:`cifd_kernels.reference._checks`;
TypeError for a wrong type, bool included, ValueError naming the argument, the
class and, in a sequence, the element): n, D, H, L and every ``filters`` width
ints >= 1, K an int >= 0 (0: head-less); each ``R_n`` finite and >= 0,
``len(R) == n``; ``tau``, ``init_scale`` finite and > 0; ``lam_ce``, ``lam_kl``,
``likelihood_bound`` finite and >= 0 (a bound of 0 switches it off, as
CompressAI); ``tail_mass`` in (0, 1);
``act``, ``dist``, ``backend`` among their names; ``ignore_index`` an int.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from .. import backend as _backend
from ..reference import _checks
from ..reference import rdm as _ref
from ..reference.cifd_loss import DISTORTIONS
from ..ops import rdm_bank as _ops
from ..reference.philox import draw_seed
from .entropy_bottleneck import EntropyBottleneck

_CODER_BUFFERS = ("_offset", "_quantized_cdf", "_cdf_length")

__all__ = ["RDM", "RDMBank", "RDMOutput"]


class RDMOutput(NamedTuple):
    """What :class:`RDMBank` / :class:`RDM` return (RDM: without the N dim).

    x_hat ``[N, B, D]`` reconstruction, logits ``[N, B, K]`` (``[N, B, 0]`` head-less),
    rate ``[N, B]`` nats, likelihoods ``[N, B, L]``, loss 0-dim (sum over RDMs of the stage-1 loss),
    terms dict of ``[N]`` tensors ``dist``, ``rate``, ``ce``, ``kl``, ``loss``
    (see :func:`cifd_kernels.reference.rdm.rdm_bank_loss`). fp32 (float64 for
    float64 parameters/inputs).
    """
    x_hat: torch.Tensor
    logits: torch.Tensor
    rate: torch.Tensor
    likelihoods: torch.Tensor
    loss: torch.Tensor
    terms: dict


class _StackedLinear(nn.Module):
    """N independent ``nn.Linear(in_features, out_features)``: weight [N, O, I], bias [N, O]."""

    def __init__(self, n: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(n, out_features))
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default init, per RDM
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            self.bias.uniform_(-bound, bound)

    def extra_repr(self) -> str:
        n, o, i = self.weight.shape
        return f"n={n}, in_features={i}, out_features={o}"


class _RDMCommon(nn.Module):
    """Hyperparameters and the forward shared by RDM and RDMBank."""

    def _init_common(self, n, D, H, L, K, R, act, dist, lam_ce, lam_kl, tau, filters, init_scale,
                     tail_mass, likelihood_bound, ignore_index, backend):
        """Validate and store the hyperparameters (``n`` and ``R`` already checked by
        the subclass, which knows their form)."""
        where = type(self).__name__
        D, H, L = (_checks.check_int(name, v, where) for name, v in (("D", D), ("H", H), ("L", L)))
        K = _checks.check_int("K", K, where, lo=0)  # 0: head-less
        self.n, self.D, self.H, self.L, self.K = n, D, H, L, K
        self.act = _checks.check_choice("act", act, _ref.ACTIVATIONS, where)
        self.dist = _checks.check_choice("dist", dist, DISTORTIONS, where)
        self.lam_ce = _checks.check_finite_nonneg("lam_ce", lam_ce, where)
        self.lam_kl = _checks.check_finite_nonneg("lam_kl", lam_kl, where)
        self.tau = _checks.check_positive("tau", tau, where)
        self.ignore_index = _checks.check_int("ignore_index", ignore_index, where, lo=None)
        if isinstance(filters, (str, bytes)) or not isinstance(filters, Sequence):
            raise TypeError(f"filters must be a sequence of ints, got {type(filters).__name__} ({where})")
        filters = tuple(_checks.check_int("filters", f, where, index=i) for i, f in enumerate(filters))
        init_scale = _checks.check_positive("init_scale", init_scale, where)
        tail_mass = _checks.check_prob("tail_mass", tail_mass, where, lo_closed=False, hi_closed=False)
        likelihood_bound = _checks.check_finite_nonneg("likelihood_bound", likelihood_bound, where)
        self.backend = None if backend is None else _backend.check_backend_name(backend)
        self._R = tuple(R)
        # The math reads R from a device buffer (no host-to-device copy per step);
        # the exact Python values stay in ``R``.
        self.register_buffer("R_tensor", torch.tensor(self._R, dtype=torch.float32), persistent=False)
        self.entropy_bottleneck = EntropyBottleneck(n * L, filters=filters, init_scale=init_scale,
                                                    tail_mass=tail_mass,
                                                    likelihood_bound=likelihood_bound)

    @property
    def R(self) -> tuple[float, ...]:
        """The distortion weights, one per RDM (a hyperparameter: read-only)."""
        return self._R

    def _stacked(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _names(self) -> tuple[str, ...]:
        return _ref.param_names(self.K)

    def _forward_bank(self, x, teacher_logits, labels, seed, offset) -> RDMOutput:
        _ref.check_headless(self.K, labels, teacher_logits, type(self).__name__)
        eb = self.entropy_bottleneck
        mats, biases, facs = list(eb.matrices), list(eb.biases), list(eb.factors)
        kw = dict(act=self.act, likelihood_bound=eb.likelihood_bound, backend=self.backend)
        if self.training:
            if seed is None:
                seed = draw_seed()
            out = _ops.rdm_bank_forward(x, self._stacked(), mats, biases, facs, mode="noise", seed=seed,
                                        offset=offset, **kw)
        else:
            with torch.no_grad():
                out = _ops.rdm_bank_forward(x, self._stacked(), mats, biases, facs, eb.medians(),
                                            mode="dequantize", **kw)
        # The fused loss takes R as Python numbers; the reference reads the device
        # buffer (a list would be a host-to-device copy per step).
        kernel = _backend.resolve(_ops.OP, self.backend, x.device) != "reference"
        R = self.R if kernel else self.R_tensor
        with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
            loss, terms = _ops.rdm_bank_loss(x, out.x_hat, out.logits, out.rate, R, labels,
                                             teacher_logits, dist=self.dist, lam_ce=self.lam_ce,
                                             lam_kl=self.lam_kl, tau=self.tau,
                                             ignore_index=self.ignore_index, backend=self.backend)
        return RDMOutput(out.x_hat, out.logits, out.rate, out.likelihoods, loss, terms)

    @torch.no_grad()
    def _frozen_targets(self, x):
        eb = self.entropy_bottleneck
        mats, biases, facs = list(eb.matrices), list(eb.biases), list(eb.factors)
        out = _ops.rdm_bank_forward(x, self._stacked(), mats, biases, facs, eb.medians(),
                                    mode="dequantize", act=self.act, need_rate=False,
                                    backend=self.backend)
        return out.x_hat, out.logits

    def aux_loss(self) -> torch.Tensor:
        """The entropy model's auxiliary quantile loss (CompressAI's ``aux_loss``)."""
        return self.entropy_bottleneck.loss()

    def _hparams(self) -> dict:
        eb = self.entropy_bottleneck
        return dict(act=self.act, dist=self.dist, lam_ce=self.lam_ce, lam_kl=self.lam_kl,
                    tau=self.tau, filters=eb.filters, init_scale=eb.init_scale,
                    tail_mass=eb.tail_mass, likelihood_bound=eb.likelihood_bound,
                    ignore_index=self.ignore_index, backend=self.backend)

    def _same_hparams(self, other: "_RDMCommon") -> bool:
        # The likelihood bound round-trips through a float32 state-dict buffer, so a
        # reloaded module holds float32(bound): compare it at that precision.
        a, b = self._hparams(), other._hparams()
        f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731
        return f32(a.pop("likelihood_bound")) == f32(b.pop("likelihood_bound")) and a == b

    def _load_exact(self, state: dict, bound: float) -> None:
        """load_state_dict, keeping the source's exact (Python float) likelihood bound
        rather than its float32 buffer copy, so bank and RDMs clamp identically."""
        self.load_state_dict(state)
        lb = getattr(self.entropy_bottleneck, "likelihood_lower_bound", None)
        if lb is not None:
            lb.value = bound

    def extra_repr(self) -> str:
        return (f"n={self.n}, D={self.D}, H={self.H}, L={self.L}, K={self.K}, act={self.act}, "
                f"dist={self.dist}, lam_ce={self.lam_ce}, lam_kl={self.lam_kl}, tau={self.tau}")


class RDMBank(_RDMCommon):
    """N Rate-Distortion Modules on the same teacher embedding, trained in one pass.

    Args:
        n: number of RDMs N (int >= 1).
        D, H, L: embedding, hidden and latent widths (ints >= 1).
        K: class count, the head's width (int >= 0). ``K = 0``: head-less RDMs (no
            head, no ``head.*`` state, logits ``[N, B, 0]``, loss ``R * dist + rate``;
            the paper's CLIP setting).
        R: N distortion weights (sequence; None = all 1.0), each finite and >= 0.
            ``R = 0`` is allowed: a degenerate "rate only" RDM (``rate + CE + KL``,
            the reconstruction unweighted); negative R would reward distortion.
            Paper: CIFAR-100 (1.0, 0.8, 0.6), ImageNet (1e4, 5e3, 1e3) with smooth-L1.
        act: ``"relu"`` (project default) or ``"gelu"``.
        dist: ``"mse"`` or ``"smooth_l1"`` (per-sample sum over D).
        lam_ce, lam_kl: CE and KL weights, finite and >= 0 (0 leaves the term out);
            tau: temperature, finite and > 0 (KL scaled by tau^2).
            The paper gives no stage-1 tau; the default 2.0 is its stage-2 value.
        filters, init_scale, tail_mass, likelihood_bound: the entropy model's
            (widths ints >= 1; init_scale > 0; tail_mass in (0, 1); bound >= 0).
        ignore_index: label value left out of CE (an int).
        backend: ``auto|cuda|triton|cpu|reference`` (default ``$CIFD_BACKEND``/auto):
            the fused bank (:mod:`cifd_kernels.ops.rdm_bank`) on the kernel backends,
            the eager reference otherwise.
    """

    def __init__(self, n: int, D: int, H: int, L: int, K: int,
                 R: Union[Sequence[float], None] = None, act: str = "relu", dist: str = "mse",
                 lam_ce: float = 1.0, lam_kl: float = 1.0, tau: float = 2.0,
                 filters: Sequence[int] = (3, 3, 3, 3), init_scale: float = 10.0,
                 tail_mass: float = 1e-9, likelihood_bound: float = 1e-9, ignore_index: int = -100,
                 backend: Optional[str] = None):
        super().__init__()
        where = type(self).__name__
        n = _checks.check_int("n", n, where)
        if R is None:
            R = (1.0,) * n
        else:
            R = _checks.check_sequence("R", R, _checks.check_finite_nonneg, where, length=n, what="n")
        self._init_common(n, D, H, L, K, R, act, dist, lam_ce, lam_kl, tau, filters, init_scale,
                          tail_mass, likelihood_bound, ignore_index, backend)
        self.enc1 = _StackedLinear(n, D, H)
        self.enc2 = _StackedLinear(n, H, L)
        self.dec1 = _StackedLinear(n, L, H)
        self.dec2 = _StackedLinear(n, H, D)
        self.head = _StackedLinear(n, D, K) if K > 0 else None  # None: no head.* state

    def _stacked(self):
        return {name: _get(self, name) for name in self._names()}

    def forward(self, x: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, seed: Optional[int] = None,
                offset: int = 0) -> RDMOutput:
        """Run all N RDMs on the teacher embedding.

        Args:
            x: ``[B, D]`` teacher embedding (any float dtype; fp32 math).
            teacher_logits: ``[B, K]`` or None (KL term left out); must be None when
                K = 0 (ValueError naming it).
            labels: ``[B]`` integer or None (CE term left out); must be None when
                K = 0 (ValueError naming it).
            seed: Philox seed for the training noise (Python int, or a 0-dim int64 CPU
                tensor); None draws one (:func:`cifd_kernels.reference.philox.draw_seed`;
                under ``torch.compile`` drawn in the graph: no graph break). Unused in eval.
            offset: base counter; RDM n, sample b, latent l uses
                ``offset + n*B*L + b*L + l``. A step consumes N*B*L counters.

        Training mode: noisy latent, differentiable outputs and loss. Eval mode
        (frozen RDMs, stage 2): latent rounded around the channel medians, all
        under ``no_grad``, deterministic. See :class:`RDMOutput`. An empty batch
        raises ValueError (the batch-mean loss is undefined).
        """
        return self._forward_bank(x, teacher_logits, labels, seed, offset)

    def frozen_targets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen bank's stage-2 targets for a teacher embedding ``x`` [B, D]:
        ``(x_hat [N, B, D], logits [N, B, K])`` (logits ``[N, B, 0]`` when K = 0), exactly
        the eval-mode forward's (latent rounded around the channel medians), under
        ``no_grad`` and in either mode, without the density evaluation, rates and losses
        the forward also computes."""
        return self._frozen_targets(x)

    @classmethod
    def from_rdms(cls, rdms: Sequence["RDM"]) -> "RDMBank":
        """A bank whose RDM n is ``rdms[n]``: parameters copied (stacked), entropy
        models concatenated channel-wise (coder tables too, if every RDM has them).
        All RDMs must share D, H, L, K and every hyperparameter except R; the bank
        takes their device and dtype. Running the bank with offset o equals running
        RDM n with offset ``o + n*B*L``."""
        rdms = list(rdms)
        if len(rdms) == 0:
            raise ValueError("from_rdms needs at least one RDM")
        for i, r in enumerate(rdms):
            if not isinstance(r, RDM):
                raise TypeError(f"rdms[{i}] must be an RDM, got {type(r).__name__}")
        first = rdms[0]
        sizes, hp = (first.D, first.H, first.L, first.K), first._hparams()
        for i, r in enumerate(rdms[1:], 1):
            if (r.D, r.H, r.L, r.K) != sizes:
                raise ValueError(f"rdms[{i}] has (D, H, L, K) = {(r.D, r.H, r.L, r.K)}, rdms[0] {sizes}")
            if not r._same_hparams(first):
                raise ValueError(f"rdms[{i}] hyperparameters {r._hparams()} differ from rdms[0]'s {hp}")
        bank = cls(len(rdms), *sizes, R=[r.R[0] for r in rdms], **hp)
        ref_t = first.enc1.weight
        bank.to(device=ref_t.device, dtype=ref_t.dtype)
        state = {name: torch.stack([_get(r, name).detach() for r in rdms]) for name in bank._names()}
        state.update(_cat_eb_states([r.entropy_bottleneck for r in rdms], "entropy_bottleneck."))
        bank._load_exact(state, first.entropy_bottleneck.likelihood_bound)
        bank.train(first.training)
        return bank

    def split(self) -> list["RDM"]:
        """The N RDMs of the bank, as independent :class:`RDM` modules (copies);
        the inverse of :meth:`from_rdms`."""
        hp = self._hparams()
        sd = self.state_dict()
        ebs = _split_eb_state(self.entropy_bottleneck, self.n, self.L)
        out = []
        for i in range(self.n):
            r = RDM(self.D, self.H, self.L, self.K, R=self.R[i], **hp)
            r.to(device=self.enc1.weight.device, dtype=self.enc1.weight.dtype)
            state = {name: sd[name][i].clone() for name in self._names()}
            state.update({"entropy_bottleneck." + k: v for k, v in ebs[i].items()})
            r._load_exact(state, self.entropy_bottleneck.likelihood_bound)
            r.train(self.training)
            out.append(r)
        return out


class RDM(_RDMCommon):
    """One Rate-Distortion Module: the N = 1 case of :class:`RDMBank` with
    ``nn.Linear`` layers (``enc1``, ``enc2``, ``dec1``, ``dec2``, ``head``; ``head`` None
    when K = 0, head-less) and an ``EntropyBottleneck(L)``. Arguments as
    :class:`RDMBank` (and validated alike), with ``R`` one number, finite and >= 0
    (default 1.0). Outputs lose the N dim: x_hat ``[B, D]``, logits ``[B, K]`` (``[B, 0]``
    head-less), rate ``[B]``, likelihoods ``[B, L]``, 0-dim terms. Training noise:
    sample b, latent l uses counter ``offset + b*L + l``."""

    def __init__(self, D: int, H: int, L: int, K: int, R: float = 1.0, act: str = "relu",
                 dist: str = "mse", lam_ce: float = 1.0, lam_kl: float = 1.0, tau: float = 2.0,
                 filters: Sequence[int] = (3, 3, 3, 3), init_scale: float = 10.0,
                 tail_mass: float = 1e-9, likelihood_bound: float = 1e-9, ignore_index: int = -100,
                 backend: Optional[str] = None):
        super().__init__()
        R = _checks.check_finite_nonneg("R", R, type(self).__name__)  # one number: RDMBank takes sequences
        self._init_common(1, D, H, L, K, (R,), act, dist, lam_ce, lam_kl, tau, filters, init_scale,
                          tail_mass, likelihood_bound, ignore_index, backend)
        self.enc1 = nn.Linear(D, H)
        self.enc2 = nn.Linear(H, L)
        self.dec1 = nn.Linear(L, H)
        self.dec2 = nn.Linear(H, D)
        self.head = nn.Linear(D, K) if K > 0 else None  # None: no head.* state

    def _stacked(self):
        return {name: _get(self, name).unsqueeze(0) for name in self._names()}

    def forward(self, x: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, seed: Optional[int] = None,
                offset: int = 0) -> RDMOutput:
        """As :meth:`RDMBank.forward`, without the N dim."""
        out = self._forward_bank(x, teacher_logits, labels, seed, offset)
        return RDMOutput(out.x_hat[0], out.logits[0], out.rate[0], out.likelihoods[0], out.loss,
                         {k: v[0] for k, v in out.terms.items()})

    def frozen_targets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`RDMBank.frozen_targets`, without the N dim: ``(x_hat [B, D], logits [B, K])``
        (logits ``[B, 0]`` when K = 0)."""
        x_hat, logits = self._frozen_targets(x)
        return x_hat[0], logits[0]


def _get(module: nn.Module, name: str) -> torch.Tensor:
    """``module.<layer>.<weight|bias>`` for a parameter name such as ``"enc1.weight"``."""
    layer, p = name.split(".")
    return getattr(getattr(module, layer), p)


# ---------------------------------------------------------------------------- entropy-model surgery

def _cat_eb_states(ebs: Sequence[EntropyBottleneck], prefix: str) -> dict:
    """Concatenate the states of entropy models over L channels each into one over
    N*L channels. Per-channel tensors (parameters, ``_offset``, ``_cdf_length``)
    concatenate on dim 0; ``_quantized_cdf`` rows are zero-padded to the widest
    (CompressAI pads rows the same way); ``target`` and the bound are shared."""
    sds = [eb.state_dict() for eb in ebs]
    out = {}
    filled = [sd["_offset"].numel() > 0 for sd in sds]
    for key, v in sds[0].items():
        if key in _CODER_BUFFERS:
            if not all(filled):
                out[prefix + key] = torch.zeros(0, dtype=v.dtype, device=v.device)
                continue
            if key == "_quantized_cdf":
                width = max(sd[key].shape[1] for sd in sds)
                out[prefix + key] = torch.cat(
                    [nn.functional.pad(sd[key], (0, width - sd[key].shape[1])) for sd in sds])
                continue
        if key in ("target", "likelihood_lower_bound.bound"):
            out[prefix + key] = v.clone()
            continue
        out[prefix + key] = torch.cat([sd[key] for sd in sds])
    return out


def _split_eb_state(eb: EntropyBottleneck, n: int, L: int) -> list[dict]:
    """Inverse of :func:`_cat_eb_states`: n states over L channels each. Each
    ``_quantized_cdf`` is trimmed to its widest row (``max(_cdf_length)``), the
    width CompressAI's ``update()`` gives it (host read; not a forward path)."""
    sd = eb.state_dict()
    filled = sd["_offset"].numel() > 0
    out = []
    for i in range(n):
        part = {}
        for key, v in sd.items():
            if key in ("target", "likelihood_lower_bound.bound"):
                part[key] = v.clone()
            elif key in _CODER_BUFFERS and not filled:
                part[key] = v.clone()
            elif key == "_quantized_cdf":
                width = int(sd["_cdf_length"][i * L:(i + 1) * L].max())
                part[key] = v[i * L:(i + 1) * L, :width].clone()
            else:
                part[key] = v[i * L:(i + 1) * L].clone()
        out.append(part)
    return out
