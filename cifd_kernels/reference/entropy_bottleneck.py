# SPDX-License-Identifier: Apache-2.0
"""Factorized entropy model (Balle et al.), CompressAI-compatible: the eager oracle.

docs/METHOD.md section 1. Per channel ``c`` a monotone cumulative-logit
function ``f_c`` (layer widths ``(1,) + filters + (1,)``) gives the mass of the
unit bin around ``yh``::

    p_c(yh) = sigmoid(f_c(yh + 1/2)) - sigmoid(f_c(yh - 1/2))

computed in the stable form (see :func:`likelihood`) and bounded below by
``bound`` with CompressAI's LowerBound gradient rule.

Conventions, shared by every backend:

* Parameters use CompressAI's layout: ``matrices[k]`` [C, f_{k+1}, f_k],
  ``biases[k]`` [C, f_{k+1}, 1], ``factors[k]`` [C, f_{k+1}, 1] (one fewer than
  matrices), ``quantiles`` [C, 1, 3], ``target`` [3].
* Activations ``y`` are [B, C, *spatial] (channel dim 1) or [B, C].
* Compute dtype: float32 for float16/bfloat16/float32 inputs and parameters;
  float64 when the input or the parameters are float64 (so gradcheck works).
  Likelihoods and rates come back in the compute dtype ("fp32"), ``y_hat`` in
  ``y.dtype``.
* Rates are in nats (natural log); ``rate_bits`` divides by ln 2.
* Empty batches give empty outputs; NaN inputs propagate to the outputs of the
  samples that hold them (checking would cost a host sync).
* Noise is Philox word 0 of counter ``offset + i``, ``i`` the element's
  row-major index in ``y``'s logical shape, whatever its strides.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import _checks
from .philox import draw_seed, philox_noise  # noqa: F401  (draw_seed re-exported for modules)

LN2 = math.log(2.0)
MODES = ("noise", "dequantize", "none")


# ----------------------------------------------------------------------------- checks
def _check_floating(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")


def check_params(matrices: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                 factors: Sequence[torch.Tensor]) -> int:
    """Check the CompressAI parameter layout; return the channel count C."""
    matrices, biases, factors = list(matrices), list(biases), list(factors)
    if len(matrices) == 0:
        raise ValueError("matrices must hold at least one [C, f_out, f_in] tensor")
    if len(biases) != len(matrices) or len(factors) != len(matrices) - 1:
        raise ValueError(
            f"expected len(biases) == len(matrices) and len(factors) == len(matrices) - 1, got "
            f"{len(matrices)} matrices, {len(biases)} biases, {len(factors)} factors")
    for name, group in (("matrices", matrices), ("biases", biases), ("factors", factors)):
        for k, t in enumerate(group):
            _check_floating(f"{name}[{k}]", t)
            if t.dim() != 3:
                raise ValueError(f"{name}[{k}] must be 3-D, got shape {tuple(t.shape)}")
    C = matrices[0].shape[0]
    dev = matrices[0].device
    f_in = 1
    for k, H in enumerate(matrices):
        f_out = H.shape[1]
        last = k == len(matrices) - 1
        if H.shape[0] != C or H.shape[2] != f_in or (last and f_out != 1):
            raise ValueError(
                f"matrices[{k}] must be [C={C}, f_out, f_in={f_in}]"
                f"{' with f_out=1' if last else ''}, got {tuple(H.shape)}")
        if tuple(biases[k].shape) != (C, f_out, 1):
            raise ValueError(f"biases[{k}] must be [{C}, {f_out}, 1], got {tuple(biases[k].shape)}")
        if not last and tuple(factors[k].shape) != (C, f_out, 1):
            raise ValueError(f"factors[{k}] must be [{C}, {f_out}, 1], got {tuple(factors[k].shape)}")
        for name, t in (("matrices", H), ("biases", biases[k])) + (
                (("factors", factors[k]),) if not last else ()):
            if t.device != dev:
                raise ValueError(f"{name}[{k}] is on {t.device} but matrices[0] is on {dev}")
        f_in = f_out
    return C


def check_activation(name: str, y, C: int, device: torch.device) -> None:
    """``y`` must be a floating [B, C, *] tensor on the parameters' device."""
    _check_floating(name, y)
    if y.dim() < 2:
        raise ValueError(f"{name} must be [B, C, *spatial] with at least 2 dims, got shape {tuple(y.shape)}")
    if y.shape[1] != C:
        raise ValueError(f"{name} has {y.shape[1]} channels (dim 1) but the parameters have {C}")
    if y.device != device:
        raise ValueError(f"{name} is on {y.device} but the entropy-model parameters are on {device}")


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 if any of ``dtypes`` is float64."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


# ----------------------------------------------------------------------------- init
def init_params(channels: int, filters: Sequence[int] = (3, 3, 3, 3), init_scale: float = 10.0,
                tail_mass: float = 1e-9, generator: Optional[torch.Generator] = None,
                device=None) -> dict:
    """CompressAI's initialisation of an entropy bottleneck with ``channels`` channels.

    Returns a dict of float32 tensors (``requires_grad=False``; wrap them in
    Parameters yourself): ``matrices`` (k = 0..len(filters)) filled with
    ``log(expm1(1 / scale / f_{k+1}))``, ``scale = init_scale ** (1 / (len(filters) + 1))``;
    ``biases`` uniform in [-1/2, 1/2) drawn from ``generator`` (CPU; default
    torch's global one); ``factors`` zeros; ``quantiles`` [C, 1, 3] =
    (-init_scale, 0, init_scale); ``target`` [3] = (-t, 0, t),
    ``t = ln(2 / tail_mass - 1)``.
    """
    channels = int(channels)
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    filters = tuple(int(f) for f in filters)
    if any(f < 1 for f in filters):
        raise ValueError(f"filters must be positive widths, got {filters}")
    if not init_scale > 0:
        raise ValueError(f"init_scale must be > 0, got {init_scale}")
    if not 0 < tail_mass < 1:
        raise ValueError(f"tail_mass must be in (0, 1), got {tail_mass}")
    widths = (1,) + filters + (1,)
    scale = float(init_scale) ** (1.0 / (len(filters) + 1))
    matrices, biases, factors = [], [], []
    for k in range(len(filters) + 1):
        f_in, f_out = widths[k], widths[k + 1]
        # softplus(init) = 1 / scale / f_out: each layer scales by 1/scale on average.
        fill = math.log(math.expm1(1.0 / scale / f_out))
        matrices.append(torch.full((channels, f_out, f_in), fill, dtype=torch.float32))
        biases.append(torch.empty((channels, f_out, 1), dtype=torch.float32).uniform_(-0.5, 0.5, generator=generator))
        if k < len(filters):
            factors.append(torch.zeros((channels, f_out, 1), dtype=torch.float32))
    quantiles = torch.tensor([-init_scale, 0.0, init_scale], dtype=torch.float32).repeat(channels, 1, 1)
    t = math.log(2.0 / tail_mass - 1.0)
    target = torch.tensor([-t, 0.0, t], dtype=torch.float32)
    out = {"matrices": matrices, "biases": biases, "factors": factors,
           "quantiles": quantiles, "target": target}
    if device is not None:
        out = {k: ([t.to(device) for t in v] if isinstance(v, list) else v.to(device))
               for k, v in out.items()}
    return out


# ----------------------------------------------------------------------------- density
def logits_cumulative(x: torch.Tensor, matrices: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                      factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Cumulative logits ``f_c(x)``, CompressAI's ``_logits_cumulative``.

    ``x`` is [C, 1, N] (any leading batch dims broadcast too); returns [C, 1, N]
    in the promoted dtype of ``x`` and the parameters. Autograd flows to ``x``
    and every parameter (callers detach what they want frozen)::

        h <- softplus(H_k) @ h + b_k;   h <- h + tanh(a_k) * tanh(h)  (all but the last layer)
    """
    h = x
    n_fact = len(factors)
    for k, (H, b) in enumerate(zip(matrices, biases)):
        h = torch.matmul(F.softplus(H), h) + b
        if k < n_fact:
            h = h + torch.tanh(factors[k]) * torch.tanh(h)
    return h


class _LowerBound(torch.autograd.Function):
    """max(x, bound), gradient passed where x >= bound or where it pushes x up (grad < 0)."""

    @staticmethod
    def forward(ctx, x, bound: float):
        ctx.bound = bound
        ctx.save_for_backward(x)
        return torch.clamp_min(x, bound)  # clamp_min propagates NaN

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        passes = (x >= ctx.bound) | (grad < 0)
        return torch.where(passes, grad, torch.zeros_like(grad)), None


def lower_bound(x: torch.Tensor, bound: float) -> torch.Tensor:
    """``max(x, bound)`` with CompressAI's LowerBound gradient: ``grad_x = grad`` where
    ``x >= bound`` or ``grad < 0`` (descent would raise x), else 0. ``bound`` is a
    Python float, finite (ValueError naming ``bound``, as on every backend); ``bound <= 0``
    returns ``x`` unchanged (CompressAI skips the bound)."""
    if _checks.check_finite("bound", bound) <= 0:
        return x
    return _LowerBound.apply(x, float(bound))


def _to_channel_rows(y: torch.Tensor) -> torch.Tensor:
    """[B, C, *] -> [C, 1, N], N = B * prod(spatial), in CompressAI's (b, spatial) order."""
    C = y.shape[1]
    return y.transpose(0, 1).reshape(C, 1, -1)


def _from_channel_rows(v: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`_to_channel_rows` for a [B, C, *] ``shape``."""
    B, C = shape[0], shape[1]
    return v.reshape((C, B) + tuple(shape[2:])).transpose(0, 1)


def _bin_mass(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """sigmoid(upper) - sigmoid(lower) without cancellation in the upper tail.

    ``s = -sign(lower + upper)`` reflects both logits into the lower tail, where
    sigmoid is accurate; ``p = |sigmoid(s*upper) - sigmoid(s*lower)|``. sign(0) is
    taken as +1 (s = +1 when lower + upper <= 0), so a bin centred on the median
    never gets s = 0 (which would give p = 0). s carries no gradient.
    """
    s = torch.where(lower + upper > 0, -1.0, 1.0).to(lower.dtype)
    return torch.abs(torch.sigmoid(s * upper) - torch.sigmoid(s * lower))


def _likelihood_rows(v: torch.Tensor, matrices, biases, factors, bound: float, cdt: torch.dtype):
    params = [[t.to(cdt) for t in g] for g in (matrices, biases, factors)]
    lower = logits_cumulative(v - 0.5, *params)
    upper = logits_cumulative(v + 0.5, *params)
    return lower_bound(_bin_mass(lower, upper), bound)


def likelihood(y_hat: torch.Tensor, matrices: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
               factors: Sequence[torch.Tensor], bound: float = 1e-9) -> torch.Tensor:
    """Bin mass ``p_c(y_hat)`` of every element, lower-bounded by ``bound``.

    Args:
        y_hat: [B, C, *spatial] or [B, C], floating; channel dim 1. Any strides.
        matrices, biases, factors: CompressAI-layout parameters (module docstring).
        bound: Python float; likelihoods below it are raised to it with
            CompressAI's LowerBound gradient (:func:`lower_bound`); <= 0 disables.

    Returns:
        Likelihoods of ``y_hat``'s shape, in the compute dtype (float32, or
        float64 for float64 inputs/parameters), in (0, 1].
    """
    C = check_params(matrices, biases, factors)
    check_activation("y_hat", y_hat, C, matrices[0].device)
    cdt = compute_dtype(y_hat.dtype, matrices[0].dtype)
    v = _to_channel_rows(y_hat.to(cdt))
    p = _likelihood_rows(v, matrices, biases, factors, bound, cdt)
    return _from_channel_rows(p, y_hat.shape).contiguous()


def medians(quantiles: torch.Tensor) -> torch.Tensor:
    """Channel medians [C] = ``quantiles[:, 0, 1]`` (a view; gradient flows to quantiles)."""
    _check_floating("quantiles", quantiles)
    if quantiles.dim() != 3 or quantiles.shape[1:] != (1, 3):
        raise ValueError(f"quantiles must be [C, 1, 3], got shape {tuple(quantiles.shape)}")
    return quantiles[:, 0, 1]


def check_medians(medians: Optional[torch.Tensor], C: int, device) -> None:
    """``mode="dequantize"``'s medians: a floating ``[C]`` tensor on y's ``device`` (the
    check of every backend)."""
    if medians is None:
        raise ValueError(f'mode="dequantize" needs medians [{C}]')
    _check_floating("medians", medians)
    if tuple(medians.shape) != (C,):
        raise ValueError(f"medians must be [{C}], got shape {tuple(medians.shape)}")
    if medians.device != device:
        raise ValueError(f"medians is on {medians.device} but y is on {device}")


def entropy_bottleneck(y: torch.Tensor, matrices: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                       factors: Sequence[torch.Tensor], medians: Optional[torch.Tensor] = None,
                       mode: str = "noise", seed: int = 0, offset: int = 0,
                       bound: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantization proxy and likelihoods, CompressAI's ``EntropyBottleneck.forward``.

    Args:
        y: [B, C, *spatial] or [B, C], floating, any strides; channel dim 1.
        matrices, biases, factors: CompressAI-layout parameters on ``y``'s device.
        medians: [C] channel medians (:func:`medians` of the quantiles); needed
            by ``mode="dequantize"`` only (gradient flows to them, as in CompressAI).
        mode: ``"noise"`` (training): ``y_hat = y + u``, ``u`` = Philox word 0 of
            counter ``offset + i`` minus 1/2 (float32), ``i`` the row-major index
            of the element in ``y``'s logical shape; ``"dequantize"`` (evaluation):
            ``y_hat = round(y - m_c) + m_c``; ``"none"``: ``y_hat = y``.
        seed, offset: Python ints in [0, 2**63), used by ``"noise"`` only.
        bound: likelihood lower bound (:func:`likelihood`).

    Returns:
        ``(y_hat, likelihoods)``: ``y_hat`` in ``y.dtype`` and ``y``'s shape
        (contiguous); likelihoods in the compute dtype (float32, or float64),
        same shape. Likelihoods are evaluated at the compute-dtype ``y_hat``,
        before it is cast to ``y.dtype`` (as a fused kernel does).
    """
    C = check_params(matrices, biases, factors)
    check_activation("y", y, C, matrices[0].device)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    cdt = compute_dtype(y.dtype, matrices[0].dtype)
    yc = y.to(cdt)
    if mode == "noise":
        u = philox_noise(y.shape, seed, offset, device=y.device)  # float32, logical row-major
        yh = yc + u.to(cdt)
    elif mode == "dequantize":
        check_medians(medians, C, y.device)
        m = medians.to(cdt).reshape((1, C) + (1,) * (y.dim() - 2))
        yh = torch.round(yc - m) + m  # round has zero gradient: y gets none, medians get 1
    else:
        yh = yc
    p = _likelihood_rows(_to_channel_rows(yh), matrices, biases, factors, bound, cdt)
    lik = _from_channel_rows(p, y.shape).contiguous()
    return yh.to(y.dtype).contiguous(), lik


# ----------------------------------------------------------------------------- rates, aux
def rate_nats(likelihoods: torch.Tensor) -> torch.Tensor:
    """Per-sample rate ``-sum ln(likelihood)`` over all non-batch dims: [B], in nats.

    Computed in float32 (float64 for float64 input). [B] with B = 0 for an empty batch.
    """
    _check_floating("likelihoods", likelihoods)
    if likelihoods.dim() < 1:
        raise ValueError("likelihoods must have a batch dim")
    lk = likelihoods.to(compute_dtype(likelihoods.dtype))
    nll = -torch.log(lk)
    return (nll.flatten(1) if nll.dim() > 1 else nll[:, None]).sum(1)


def rate_bits(likelihoods: torch.Tensor) -> torch.Tensor:
    """Per-sample rate in bits: :func:`rate_nats` / ln 2. [B]."""
    return rate_nats(likelihoods) / LN2


def aux_loss(quantiles: torch.Tensor, matrices: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
             factors: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """CompressAI's auxiliary quantile loss ``sum |f_c(q_{c,j}) - target_j|``: a scalar.

    Trains ``quantiles`` [C, 1, 3] towards the ``tail_mass/2``, median and
    ``1 - tail_mass/2`` points of each channel's density (``target`` [3] holds
    their logits). The density parameters are detached: the gradient reaches
    ``quantiles`` only. Compute dtype as the other functions.
    """
    C = check_params(matrices, biases, factors)
    medians(quantiles)  # shape check
    if quantiles.shape[0] != C:
        raise ValueError(f"quantiles has {quantiles.shape[0]} channels but the parameters have {C}")
    _check_floating("target", target)
    if target.numel() != 3:
        raise ValueError(f"target must hold 3 values, got shape {tuple(target.shape)}")
    cdt = compute_dtype(quantiles.dtype, matrices[0].dtype)
    params = [[t.detach().to(cdt) for t in g] for g in (matrices, biases, factors)]
    logits = logits_cumulative(quantiles.to(cdt), *params)
    return torch.abs(logits - target.to(cdt).reshape(1, 1, 3)).sum()
