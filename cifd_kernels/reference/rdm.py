# SPDX-License-Identifier: Apache-2.0
"""Eager reference of Rate-Distortion Modules (docs/METHOD.md section 2).

One RDM with distortion weight ``R``::

    z   = W2 act(W1 X + c1) + c2         # encoder, D -> H -> L
    zh  = z + u (training) | round(z - m) + m (frozen) | z ("none")
    Xh  = W4 act(W3 zh + c3) + c4        # decoder, L -> H -> D
    V_R = W5 Xh + c5                     # head,    D -> K   (none when K = 0)
    L_RDM = R * dist(X, Xh) + rate(zh) + lam_ce * CE(y, V_R) + lam_kl * tau^2 KL(p(V_T) || p(V_R))

(batch means; ``act`` is ``relu`` or ``gelu`` (exact, erf form); ``dist`` is a
per-sample sum over D, see :func:`.cifd_loss.distortion`; rate in nats).

Head-less RDMs (``K = 0``, the paper's CLIP setting, docs/METHOD.md end of section
4): no head and no logit terms, ``L_RDM = R * dist(X, Xh) + rate(zh)``. Their
``params`` omit ``head.weight`` / ``head.bias`` (:func:`param_names`), ``logits`` is
an empty ``[N, B, 0]`` tensor, ``ce`` and ``kl`` are zeros, and labels or teacher
logits are refused (:func:`check_headless`).

A bank of N RDMs is computed in one pass with stacked parameters. Layout
(``params`` dict, the same names as the ``RDMBank`` module's state dict)::

    enc1.weight [N, H, D]  enc1.bias [N, H]
    enc2.weight [N, L, H]  enc2.bias [N, L]
    dec1.weight [N, H, L]  dec1.bias [N, H]
    dec2.weight [N, D, H]  dec2.bias [N, D]
    head.weight [N, K, D]  head.bias [N, K]     (absent when K = 0: no head)

Row n of each is RDM n's ``nn.Linear`` weight/bias, so one RDM is the N = 1 case
(:func:`rdm_forward` takes the un-stacked ``[H, D]`` etc. form). The bank's
entropy model is ONE factorized density over ``N * L`` channels, channel
``n * L + l`` being latent l of RDM n (CompressAI parameter layout,
:mod:`.entropy_bottleneck`).

Latent and noise layout: the latent is ``[N, B, L]``; in ``"noise"`` mode RDM n,
sample b, latent l gets ``u = philox_noise`` of counter
``offset + n*B*L + b*L + l`` (word 0). So RDM n run alone with offset
``offset + n*B*L`` draws exactly the noise it gets inside the bank, which makes
"a bank of N RDMs equals the N RDMs one by one" exact. The bank draws the noise
itself (the bottleneck's own counter order is row-major over ``[B, C]``, which
interleaves RDMs) and evaluates the density with
:func:`.entropy_bottleneck.likelihood`, i.e. the same math as
``entropy_bottleneck(mode="noise")`` in the bank's counter order.

fp32 math inside whatever the input dtype (float64 stays float64 for gradcheck);
outputs are fp32 (or float64).

Hyperparameters are checked where they enter (:mod:`._checks`, the message style
of :mod:`.cifd_loss`): each ``R_n`` finite and >= 0 (``R = 0`` is a valid,
degenerate "rate only" RDM: the reconstruction gets no weight, so only the CE
and KL terms pay for information through the channel), ``len(R) == N``; ``tau`` finite and > 0;
``lam_ce``, ``lam_kl`` finite and >= 0. ``R`` as a tensor is checked for shape
only (its values would need a host read).
"""
from __future__ import annotations

import math
import numbers
from typing import Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import _checks
from . import entropy_bottleneck as _eb
from ._checks import check_dim, check_nonempty, check_same_device, check_tensor
from .cifd_loss import _up, check_dist, check_tau, check_weights, compute_dtype, cross_entropy, distortion, kl_tau
from .philox import philox_noise

ACTIVATIONS = ("relu", "gelu")
MODES = ("noise", "dequantize", "none")
LAYERS = ("enc1", "enc2", "dec1", "dec2", "head")
PARAM_NAMES = tuple(f"{layer}.{p}" for layer in LAYERS for p in ("weight", "bias"))  # with a head
HEAD_NAMES = ("head.weight", "head.bias")

__all__ = [
    "ACTIVATIONS", "MODES", "LAYERS", "PARAM_NAMES", "HEAD_NAMES", "RDMBankOutput", "layers",
    "param_names", "param_shapes", "init_params", "bank_sizes", "stack_params", "unstack_params",
    "latent_noise", "quantize_latent", "latent_likelihood", "rdm_bank_forward", "check_headless",
    "rdm_bank_loss", "rdm_forward", "rdm_loss",
]


def layers(k: int) -> tuple[str, ...]:
    """The linear layers of an RDM with K classes: :data:`LAYERS`, without ``head``
    when ``K = 0``."""
    return LAYERS if k > 0 else LAYERS[:-1]


def param_names(k: int) -> tuple[str, ...]:
    """The parameter names of an RDM (bank) with K classes: :data:`PARAM_NAMES`,
    without :data:`HEAD_NAMES` when ``K = 0`` (a head-less RDM has no head)."""
    return PARAM_NAMES if k > 0 else PARAM_NAMES[:-2]


class RDMBankOutput(NamedTuple):
    """Outputs of :func:`rdm_bank_forward` (N RDMs, batch B)."""
    z: torch.Tensor            # [N, B, L] encoder output
    z_hat: torch.Tensor        # [N, B, L] latent after noise / rounding
    x_hat: torch.Tensor        # [N, B, D] reconstruction of X
    logits: torch.Tensor       # [N, B, K] RDM logits V_R ([N, B, 0] when K = 0: no head)
    likelihoods: torch.Tensor  # [N, B, L] bin probabilities (bounded below)
    rate: torch.Tensor         # [N, B] -sum_l ln p, nats


def param_shapes(n: int, d: int, h: int, l: int, k: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the stacked bank parameters (see the module docstring); no head
    entries when ``k = 0``."""
    io = {"enc1": (h, d), "enc2": (l, h), "dec1": (h, l), "dec2": (d, h), "head": (k, d)}
    out = {}
    for layer in layers(k):
        o, i = io[layer]
        out[f"{layer}.weight"] = (n, o, i)
        out[f"{layer}.bias"] = (n, o)
    return out


def init_params(n: int, d: int, h: int, l: int, k: int, generator: Optional[torch.Generator] = None,
                device=None, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Stacked bank parameters, each RDM initialised as ``nn.Linear`` does
    (weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))). ``k = 0``: a head-less
    bank, no ``head.*`` entries (the other draws are the same as with a head)."""
    for name, v in (("n", n), ("d", d), ("h", h), ("l", l), ("k", k)):
        lo = 0 if name == "k" else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be {'an int >= 0' if lo == 0 else 'a positive int'}, got {v!r}")
    out = {}
    for name, shape in param_shapes(n, d, h, l, k).items():
        fan_in = param_shapes(1, d, h, l, k)[name.split(".")[0] + ".weight"][2]
        bound = 1.0 / math.sqrt(fan_in)
        t = torch.empty(shape, dtype=dtype, device=device)
        t.uniform_(-bound, bound, generator=generator)
        out[name] = t
    return out


def _check_names(params: Mapping[str, torch.Tensor]) -> bool:
    """KeyError unless ``params`` holds every body parameter and either both head
    parameters or neither; returns whether it has a head."""
    has_head = [p in params for p in HEAD_NAMES]
    want = PARAM_NAMES if any(has_head) else param_names(0)
    missing = [p for p in want if p not in params]
    if missing:
        raise KeyError(f"params is missing {missing}" + (
            " (a head-less bank, K = 0, omits both head.weight and head.bias)" if any(has_head) and
            not all(has_head) else ""))
    return all(has_head)


def bank_sizes(params: Mapping[str, torch.Tensor]) -> tuple[int, int, int, int, int]:
    """``(N, D, H, L, K)`` of a stacked parameter dict; raises on a bad layout. A dict
    without ``head.weight`` and ``head.bias`` is a head-less bank: ``K = 0``. A head of
    zero rows is refused (K = 0 is spelt by leaving the head out)."""
    has_head = _check_names(params)
    w = params["enc1.weight"]
    if not isinstance(w, torch.Tensor) or w.dim() != 3:
        raise ValueError(f"params['enc1.weight'] must be [N, H, D], got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    n, h, d = w.shape
    l = params["enc2.weight"].shape[1] if params["enc2.weight"].dim() == 3 else -1
    k = 0
    if has_head:
        k = params["head.weight"].shape[1] if params["head.weight"].dim() == 3 else -1
        if k == 0:
            raise ValueError("params['head.weight'] has K = 0 rows: a head-less bank omits "
                             "head.weight and head.bias")
    for name, shape in param_shapes(n, d, h, l, k).items():
        t = params[name]
        check_tensor(f"params[{name!r}]", t)
        if tuple(t.shape) != shape:
            raise ValueError(f"params[{name!r}] must have shape {shape} (N, D, H, L, K = "
                             f"{n}, {d}, {h}, {l}, {k}), got {tuple(t.shape)}")
        if t.device != w.device:
            raise ValueError(f"params[{name!r}] is on {t.device} but params['enc1.weight'] is on {w.device}")
    return n, d, h, l, k


def stack_params(singles: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack N single-RDM parameter dicts (``[H, D]`` etc.) into the bank layout; all
    with a head or all head-less (no ``head.*``: K = 0)."""
    if len(singles) == 0:
        raise ValueError("stack_params needs at least one RDM")
    heads = [_check_names(s) for s in singles]
    if len(set(heads)) != 1:
        i = heads.index(not heads[0])
        raise ValueError(f"stack_params: singles[{i}] {'has a' if heads[i] else 'has no'} head but "
                         f"singles[0] {'has one' if heads[0] else 'has none'} (K = 0 omits head.*)")
    names = PARAM_NAMES if heads[0] else param_names(0)
    return {p: torch.stack([s[p] for s in singles]) for p in names}


def unstack_params(params: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Inverse of :func:`stack_params` (views into ``params``)."""
    n, _, _, _, k = bank_sizes(params)
    return [{p: params[p][i] for p in param_names(k)} for i in range(n)]


def _act(h: torch.Tensor, act: str) -> torch.Tensor:
    return torch.relu(h) if act == "relu" else F.gelu(h)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # x [B, I] or [N, B, I]; w [N, O, I]; b [N, O] -> [N, B, O]
    return torch.matmul(x, w.transpose(-1, -2)) + b.unsqueeze(-2)


def latent_noise(n: int, batch: int, l: int, seed: int, offset: int = 0, device=None) -> torch.Tensor:
    """The bank's training noise ``[N, B, L]`` in fp32: counter ``offset + n*B*L + b*L + l``."""
    return philox_noise((n, batch, l), seed, offset, device=device)


def quantize_latent(z: torch.Tensor, mode: str, seed: int = 0, offset: int = 0,
                    medians: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``z`` ``[N, B, L]`` -> ``z_hat``: ``z + u`` (``"noise"``), ``round(z - m) + m``
    with ``medians`` ``[N * L]`` (``"dequantize"``, CompressAI's rule; ``torch.round``
    rounds half to even), or ``z`` (``"none"``)."""
    _checks.check_choice("mode", mode, MODES, "quantize_latent")
    n, batch, l = z.shape
    if mode == "noise":
        return z + latent_noise(n, batch, l, seed, offset, device=z.device).to(z.dtype)
    if mode == "dequantize":
        if medians is None:
            raise ValueError("mode='dequantize' needs medians [N * L]")
        check_tensor("medians", medians, ndim=1)
        check_dim("medians", medians.shape[0], n * l, "the channel count N*L")
        check_same_device("z", z, medians=medians)
        m = _up(medians, z.dtype).reshape(n, 1, l)
        return torch.round(z - m) + m
    return z


def latent_likelihood(z_hat: torch.Tensor, matrices, biases, factors, bound: float = 1e-9) -> torch.Tensor:
    """Bin probabilities ``[N, B, L]`` of ``z_hat`` ``[N, B, L]`` under the bank's
    factorized density over ``N * L`` channels (channel ``n * L + l``)."""
    n, batch, l = z_hat.shape
    y = z_hat.permute(1, 0, 2).reshape(batch, n * l)
    lik = _eb.likelihood(y, matrices, biases, factors, bound=bound)
    return lik.reshape(batch, n, l).permute(1, 0, 2)


def check_bank_forward_hparams(act: str, mode: str, likelihood_bound: float) -> None:
    """The scalar arguments of :func:`rdm_bank_forward` (the ops check them alike)."""
    _checks.check_choice("act", act, ACTIVATIONS, "rdm_bank_forward")
    _checks.check_choice("mode", mode, MODES, "rdm_bank_forward")
    _checks.check_finite_nonneg("likelihood_bound", likelihood_bound, "rdm_bank_forward")


def rdm_bank_forward(x: torch.Tensor, params: Mapping[str, torch.Tensor], matrices, biases, factors,
                     medians: Optional[torch.Tensor] = None, *, act: str = "relu", mode: str = "noise",
                     seed: int = 0, offset: int = 0, likelihood_bound: float = 1e-9) -> RDMBankOutput:
    """Run N RDMs on the same teacher embedding.

    Args:
        x: ``[B, D]`` teacher embedding X (any float dtype; math in fp32).
        params: stacked parameters (module docstring layout); without ``head.*``
            a head-less bank (K = 0).
        matrices, biases, factors: the bank's entropy-model parameters over
            ``N * L`` channels (CompressAI layout, lists of ``[N*L, ., .]``).
        medians: ``[N * L]`` channel medians, needed for ``mode="dequantize"``.
        act: ``"relu"`` or ``"gelu"``.
        mode: ``"noise"`` (training: additive U(-1/2, 1/2) Philox noise),
            ``"dequantize"`` (frozen: rounding around the medians), ``"none"``.
        seed, offset: Philox seed and base counter (noise mode only).
        likelihood_bound: lower bound on bin probabilities.

    Returns :class:`RDMBankOutput`. B = 0 gives empty outputs; K = 0 (no head) gives
    ``logits`` an empty ``[N, B, 0]`` tensor (no graph).
    """
    check_bank_forward_hparams(act, mode, likelihood_bound)
    n, d, h, l, k = bank_sizes(params)
    check_tensor("x", x, ndim=2)
    check_same_device("x", x, **{"params['enc1.weight']": params["enc1.weight"]})
    check_dim("x", x.shape[1], d, "the embedding dim D")
    if not isinstance(matrices, (list, tuple)) or len(matrices) == 0:
        raise TypeError("matrices must be a non-empty list of tensors")
    check_dim("matrices[0]", matrices[0].shape[0], n * l, "the channel count N*L")
    check_same_device("x", x, **{"matrices[0]": matrices[0]})
    dt = compute_dtype(x, *params.values())
    p = {name: _up(t, dt) for name, t in params.items() if name in param_names(k)}
    xx = _up(x, dt)
    z = _linear(_act(_linear(xx, p["enc1.weight"], p["enc1.bias"]), act), p["enc2.weight"], p["enc2.bias"])
    z_hat = quantize_latent(z, mode, seed, offset, medians)
    x_hat = _linear(_act(_linear(z_hat, p["dec1.weight"], p["dec1.bias"]), act),
                    p["dec2.weight"], p["dec2.bias"])
    if k > 0:
        logits = _linear(x_hat, p["head.weight"], p["head.bias"])
    else:  # head-less: the NamedTuple keeps its shape with an empty [N, B, 0]
        logits = x_hat.new_zeros((n, x.shape[0], 0))
    lik = latent_likelihood(z_hat, matrices, biases, factors, likelihood_bound)
    rate = _eb.rate_nats(lik.reshape(n * x.shape[0], l)).reshape(n, x.shape[0])
    return RDMBankOutput(z, z_hat, x_hat, logits, lik, rate)


def check_R(R, n: Optional[int] = None, where: Optional[str] = None) -> tuple[float, ...]:
    """Distortion weights given as Python numbers (one number, or a sequence of N)
    as a tuple of floats, each finite and >= 0 (R = 0: a "rate only" RDM); with
    ``n``, ``len(R)`` must be ``n``. For the modules and the ops; tensors go through
    the loss's shape checks instead."""
    if isinstance(R, numbers.Real) and not isinstance(R, bool):
        R = [R]
    return _checks.check_sequence("R", R, _checks.check_finite_nonneg, where, length=n, what="N")


def _check_R(R, n: int, device, dt, where: Optional[str] = None) -> torch.Tensor:
    if isinstance(R, torch.Tensor):
        if R.dim() != 1 or R.shape[0] != n:
            raise ValueError(f"R must have shape [N] = [{n}], got {tuple(R.shape)}")
        check_tensor("R", R)
        if R.device != device:
            raise ValueError(f"R is on {R.device} but x is on {device}")
        return _up(R, dt)
    return torch.tensor(check_R(R, n, where), dtype=dt, device=device)


def check_rdm_loss_hparams(where: Optional[str] = None, *, dist: str, tau: float, ignore_index: int,
                           lam_ce: float, lam_kl: float) -> None:
    """The scalar hyperparameters of :func:`rdm_bank_loss` (also checked by the ops;
    ``R`` is :func:`check_R`'s)."""
    check_dist(dist, where)
    check_tau(tau, where=where)
    _checks.check_int("ignore_index", ignore_index, where, lo=None)
    check_weights(where, lam_ce=lam_ce, lam_kl=lam_kl)


def check_headless(k: int, labels: Optional[torch.Tensor], teacher_logits: Optional[torch.Tensor],
                   who: str = "the RDM bank") -> None:
    """A head-less bank (``K = 0``) has no logit terms: ValueError naming ``labels`` or
    ``teacher_logits`` if either is given. The same message on every backend (the
    ops and the modules call this before choosing one)."""
    if k != 0:
        return
    for name, t in (("labels", labels), ("teacher_logits", teacher_logits)):
        if t is not None:
            raise ValueError(f"{who} has no head (K = 0): {name} must be None (its stage-1 loss is "
                             f"R * dist + rate)")


def check_bank_loss_inputs(x, x_hat, logits, rate, labels, teacher_logits) -> tuple[int, int, int, int]:
    """The tensor arguments of :func:`rdm_bank_loss`, checked alike on every backend (the
    ops call this too); returns ``(N, B, D, K)``."""
    check_tensor("x", x, ndim=2)
    check_tensor("x_hat", x_hat, ndim=3)
    check_tensor("logits", logits, ndim=3)
    check_headless(logits.shape[2], labels, teacher_logits, "rdm_bank_loss: the bank")
    check_tensor("rate", rate, ndim=2)
    n, batch, d = x_hat.shape
    k = logits.shape[2]
    check_same_device("x", x, x_hat=x_hat, logits=logits, rate=rate, labels=labels,
                      teacher_logits=teacher_logits)
    check_dim("x", x.shape[0], batch, "the batch size B")
    check_dim("x", x.shape[1], d, "the embedding dim D")
    check_dim("logits", logits.shape[0], n, "the RDM count N")
    check_dim("logits", logits.shape[1], batch, "the batch size B")
    check_dim("rate", rate.shape[0], n, "the RDM count N")
    check_dim("rate", rate.shape[1], batch, "the batch size B")
    if labels is not None:
        check_tensor("labels", labels, ndim=1, integer=True)
        check_dim("labels", labels.shape[0], batch, "the batch size B")
    if teacher_logits is not None:
        check_tensor("teacher_logits", teacher_logits, ndim=2)
        check_dim("teacher_logits", teacher_logits.shape[0], batch, "the batch size B")
        check_dim("teacher_logits", teacher_logits.shape[1], k, "the class count K")
    check_nonempty("x", batch)
    return n, batch, d, k


def rdm_bank_loss(x: torch.Tensor, x_hat: torch.Tensor, logits: torch.Tensor, rate: torch.Tensor,
                  R: Union[Sequence[float], torch.Tensor], labels: Optional[torch.Tensor] = None,
                  teacher_logits: Optional[torch.Tensor] = None, *, dist: str = "mse",
                  lam_ce: float = 1.0, lam_kl: float = 1.0, tau: float = 1.0,
                  ignore_index: int = -100):
    """Stage-1 loss of every RDM (batch means) and their sum::

        loss_n = R_n * dist(X, Xh_n) + rate_n + lam_ce * CE(y, V_n)
                 + lam_kl * tau^2 * KL(p(V_T) || p(V_n))

    Head-less banks (``logits`` ``[N, B, 0]``, K = 0): ``loss_n = R_n * dist(X, Xh_n) +
    rate_n``, ``ce`` and ``kl`` zeros; ``labels`` and ``teacher_logits`` must be None
    (ValueError naming the one given, :func:`check_headless`).

    Args:
        x: ``[B, D]`` teacher embedding; x_hat ``[N, B, D]``; logits ``[N, B, K]`` (K >= 0);
        rate: ``[N, B]`` nats (from :func:`rdm_bank_forward`).
        R: ``[N]`` distortion weights, finite and >= 0 (sequence or tensor; a tensor
            is checked for shape only). ``R = 0`` is a valid "rate only" RDM.
        labels: ``[B]`` integer, or None: then the CE term is 0 (left out).
        teacher_logits: ``[B, K]``, or None: then the KL term is 0 (left out).
        dist: ``"mse"`` | ``"smooth_l1"``; tau finite and > 0; KL scaled by ``tau^2``.
        lam_ce, lam_kl: CE and KL weights, finite and >= 0.
        ignore_index: label excluded from CE (CE is the mean over the others).

    Returns ``(loss, terms)``: ``loss`` the 0-dim sum over RDMs; ``terms`` maps
    ``dist``, ``rate``, ``ce``, ``kl``, ``loss`` to ``[N]`` tensors (unweighted
    batch means, except ``loss`` which is the weighted per-RDM total).
    An empty batch (B = 0) raises ValueError.
    """
    check_rdm_loss_hparams("rdm_bank_loss", dist=dist, tau=tau, ignore_index=ignore_index,
                           lam_ce=lam_ce, lam_kl=lam_kl)
    n, batch, d, k = check_bank_loss_inputs(x, x_hat, logits, rate, labels, teacher_logits)
    dt = compute_dtype(x, x_hat, logits, rate, teacher_logits)
    Rt = _check_R(R, n, x.device, dt, "rdm_bank_loss")
    dist_n = _up(distortion(x.unsqueeze(0), x_hat, dist).mean(-1), dt)
    rate_n = _up(rate, dt).mean(-1)
    zero = torch.zeros(n, dtype=dt, device=x.device)
    if labels is not None:
        ce = cross_entropy(logits.reshape(n * batch, k), labels.repeat(n), ignore_index).reshape(n, batch)
        count = (labels != ignore_index).sum().clamp_min(1)  # CE mean over non-ignored labels
        ce_n = ce.sum(-1).to(dt) / count.to(dt)
    else:
        ce_n = zero
    if teacher_logits is not None:
        kl_n = kl_tau(teacher_logits.unsqueeze(0), logits, tau).mean(-1).to(dt)
    else:
        kl_n = zero
    if k > 0:
        loss_n = Rt * dist_n + rate_n + lam_ce * ce_n + lam_kl * kl_n
    else:  # head-less: no logit terms at all
        loss_n = Rt * dist_n + rate_n
    terms = {"dist": dist_n, "rate": rate_n, "ce": ce_n, "kl": kl_n, "loss": loss_n}
    return loss_n.sum(), terms


def _unsqueeze_single(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = PARAM_NAMES if _check_names(params) else param_names(0)
    for p in names:
        want = 2 if p.endswith("weight") else 1
        if params[p].dim() != want:
            raise ValueError(f"single-RDM params[{p!r}] must have {want} dims, got {tuple(params[p].shape)}")
    return {p: params[p].unsqueeze(0) for p in names}


def rdm_forward(x: torch.Tensor, params: Mapping[str, torch.Tensor], matrices, biases, factors,
                medians: Optional[torch.Tensor] = None, **kw) -> RDMBankOutput:
    """One RDM: :func:`rdm_bank_forward` with N = 1 and un-stacked parameters
    (``enc1.weight`` ``[H, D]``, ``enc1.bias`` ``[H]``, ...; no ``head.*``: head-less,
    K = 0; entropy model over L channels). Outputs lose the N dim: z ``[B, L]``, x_hat
    ``[B, D]``, logits ``[B, K]`` (``[B, 0]`` head-less), rate ``[B]``. Noise uses
    counter ``offset + b*L + l``."""
    out = rdm_bank_forward(x, _unsqueeze_single(params), matrices, biases, factors, medians, **kw)
    return RDMBankOutput(*(t.squeeze(0) for t in out))


def rdm_loss(x: torch.Tensor, x_hat: torch.Tensor, logits: torch.Tensor, rate: torch.Tensor, R: float,
             labels: Optional[torch.Tensor] = None, teacher_logits: Optional[torch.Tensor] = None, **kw):
    """Stage-1 loss of one RDM: :func:`rdm_bank_loss` with N = 1 on ``[B, D]``,
    ``[B, K]``, ``[B]`` inputs and a scalar ``R`` (finite, >= 0). Returns ``(loss, terms)`` with
    0-dim terms. Head-less (``logits`` ``[B, 0]``): ``R * dist + rate``, no labels or
    teacher logits."""
    check_tensor("x_hat", x_hat, ndim=2)
    check_tensor("logits", logits, ndim=2)
    check_tensor("rate", rate, ndim=1)
    if isinstance(R, torch.Tensor):
        R = R.reshape(1)
    else:
        R = [_checks.check_finite_nonneg("R", R, "rdm_loss")]
    loss, terms = rdm_bank_loss(x, x_hat.unsqueeze(0), logits.unsqueeze(0), rate.unsqueeze(0), R,
                                labels, teacher_logits, **kw)
    return loss, {key: v.squeeze(0) for key, v in terms.items()}
