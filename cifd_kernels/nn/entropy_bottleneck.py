# SPDX-License-Identifier: Apache-2.0
"""``EntropyBottleneck``: drop-in for CompressAI's, with Philox noise (docs/METHOD.md sections 1, 5).

State dicts use CompressAI's layout (``matrices.k``, ``biases.k``, ``factors.k``,
``quantiles``, buffers ``target``, ``_offset``, ``_quantized_cdf``,
``_cdf_length``, ``likelihood_lower_bound.bound``), so a CompressAI
``EntropyBottleneck`` state dict loads here (also the ``_matrix0`` / ``_bias0`` /
``_factor0`` keys of older CompressAI versions) and ours loads into CompressAI.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .. import backend as _backend
from ..reference import _checks
from ..reference import entropy_bottleneck as _ref
from ..ops.entropy_bottleneck import entropy_bottleneck as _eb_op
from ..reference.philox import draw_seed

_LEGACY = (("_matrix", "matrices"), ("_bias", "biases"), ("_factor", "factors"))
_CODER_BUFFERS = ("_offset", "_quantized_cdf", "_cdf_length")


class _LikelihoodBound(nn.Module):
    """Holds CompressAI's ``likelihood_lower_bound.bound`` buffer and the same value as a
    Python float (``value``), which is what the ops take: reading the buffer in
    forward would be a host sync. Loading a state dict updates both."""

    def __init__(self, bound: float):
        super().__init__()
        self.value = float(bound)
        self.register_buffer("bound", torch.tensor([self.value]))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "bound" in state_dict:
            self.value = float(self.bound.reshape(-1)[0])  # load time, not forward

    def extra_repr(self) -> str:
        return f"bound={self.value}"


class FactorizedDensity(nn.Module):
    """Parameters of a factorized density in CompressAI's layout, shared by
    :class:`EntropyBottleneck` and :class:`cifd_kernels.nn.IBM`.

    Holds ``matrices``/``biases``/``factors`` (ParameterLists), ``quantiles``
    [C, 1, 3], buffer ``target`` [3], the coder buffers filled by :meth:`update`,
    and the likelihood bound. ``backend`` is the name passed to
    :func:`cifd_kernels.backend.resolve` at each call.
    """


    def __init__(self, channels: int, filters: Sequence[int] = (3, 3, 3, 3), init_scale: float = 10.0,
                 tail_mass: float = 1e-9, likelihood_bound: float = 1e-9, backend: Optional[str] = None,
                 entropy_coder_precision: int = 16, deterministic: bool = False):
        super().__init__()
        p = _ref.init_params(channels, filters, init_scale, tail_mass)
        self.channels = int(channels)
        self.filters = tuple(int(f) for f in filters)
        self.init_scale = float(init_scale)
        self.tail_mass = float(tail_mass)
        self.entropy_coder_precision = int(entropy_coder_precision)
        self.backend = None if backend is None else _backend.check_backend_name(backend)
        self.deterministic = bool(deterministic)  # kernels reduce parameter grads without atomics
        self.matrices = nn.ParameterList([nn.Parameter(t) for t in p["matrices"]])
        self.biases = nn.ParameterList([nn.Parameter(t) for t in p["biases"]])
        self.factors = nn.ParameterList([nn.Parameter(t) for t in p["factors"]])
        self.quantiles = nn.Parameter(p["quantiles"])
        self.register_buffer("target", p["target"])
        for name in _CODER_BUFFERS:
            self.register_buffer(name, torch.zeros(0, dtype=torch.int32))
        if _checks.check_finite("likelihood_bound", likelihood_bound, type(self).__name__) > 0:
            # as CompressAI: no bound module when the bound is off
            self.likelihood_lower_bound = _LikelihoodBound(likelihood_bound)

    # -- helpers --------------------------------------------------------------------------------
    @property
    def likelihood_bound(self) -> float:
        lb = getattr(self, "likelihood_lower_bound", None)
        return lb.value if lb is not None else 0.0

    def _params(self):
        # ParameterList's own iteration normalises every index in Python (~30 us for
        # the 14 tensors, per call); its _parameters dict holds them in order.
        return (list(self.matrices._parameters.values()), list(self.biases._parameters.values()),
                list(self.factors._parameters.values()))

    def _check_input(self, name: str, x) -> None:
        _ref.check_activation(name, x, self.channels, self.quantiles.device)

    def medians(self) -> torch.Tensor:
        """Channel medians [C] (from ``quantiles``)."""
        return _ref.medians(self.quantiles)

    def loss(self) -> torch.Tensor:
        """CompressAI's auxiliary loss (scalar); its gradient reaches ``quantiles`` only."""
        return _ref.aux_loss(self.quantiles, *self._params(), self.target)

    @staticmethod
    def rate(likelihoods: torch.Tensor) -> torch.Tensor:
        """Per-sample rate [B] in nats from likelihoods [B, C, *] (``/ math.log(2)`` for bits)."""
        return _ref.rate_nats(likelihoods)

    @staticmethod
    def rate_bits(likelihoods: torch.Tensor) -> torch.Tensor:
        """Per-sample rate [B] in bits."""
        return _ref.rate_bits(likelihoods)

    # -- CompressAI state-dict compatibility -----------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Older CompressAI versions: _matrix0 / _bias0 / _factor0 instead of ParameterLists.
        for old, new in _LEGACY:
            for k in range(len(self.matrices)):
                key = f"{prefix}{old}{k}"
                if key in state_dict and f"{prefix}{new}.{k}" not in state_dict:
                    state_dict[f"{prefix}{new}.{k}"] = state_dict.pop(key)
        # Coder buffers are sized by update(): take the incoming sizes.
        for name in _CODER_BUFFERS:
            key = prefix + name
            if key in state_dict:
                src = state_dict[key]
                self._buffers[name] = torch.zeros(src.shape, dtype=torch.int32, device=self.quantiles.device)
        if not hasattr(self, "likelihood_lower_bound"):
            state_dict.pop(prefix + "likelihood_lower_bound.bound", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # -- entropy coding tables (only needed for real coding) -------------------------------------
    @torch.no_grad()
    def _update_quantiles(self, search_radius: float = 1e5, iters: int = 64) -> None:
        """Set ``quantiles`` by bisection so that f_c(q_j) = target_j (f is monotone)."""
        mats, bias, facs = self._params()
        C = self.channels
        for j in range(3):
            lo = torch.full((C, 1, 1), -search_radius, dtype=self.quantiles.dtype, device=self.quantiles.device)
            hi = -lo
            for _ in range(iters):
                mid = (lo + hi) / 2
                below = _ref.logits_cumulative(mid, mats, bias, facs) < self.target[j]
                lo = torch.where(below, mid, lo)
                hi = torch.where(below, hi, mid)
            self.quantiles[:, :, j] = ((lo + hi) / 2)[:, :, 0]

    @torch.no_grad()
    def update(self, force: bool = False, update_quantiles: bool = False) -> bool:
        """Fill ``_offset``, ``_quantized_cdf``, ``_cdf_length`` as CompressAI's ``update()``.

        Returns False (doing nothing) if they are already filled and not ``force``.
        The pmf -> quantized-CDF step uses CompressAI's C++ helper, so this method
        needs ``compressai`` installed (nothing else in cifd_kernels does).
        """
        if self._offset.numel() > 0 and not force:
            return False
        try:
            from compressai._CXX import pmf_to_quantized_cdf
        except ImportError as e:
            raise ImportError("update() builds entropy-coding tables with CompressAI's "
                              f"pmf_to_quantized_cdf; install compressai ({e})") from e
        if update_quantiles:
            self._update_quantiles()
        q = self.quantiles[:, 0, :]
        med = q[:, 1]
        minima = torch.ceil(med - q[:, 0]).int().clamp_min(0)
        maxima = torch.ceil(q[:, 2] - med).int().clamp_min(0)
        pmf_start = med - minima
        pmf_length = maxima + minima + 1
        max_length = int(pmf_length.max())
        samples = (torch.arange(max_length, device=med.device) + pmf_start[:, None])[:, None, :]  # [C,1,L]
        mats, bias, facs = self._params()
        lower = _ref.logits_cumulative(samples - 0.5, mats, bias, facs)
        upper = _ref.logits_cumulative(samples + 0.5, mats, bias, facs)
        pmf = _ref._bin_mass(lower, upper)[:, 0, :]
        tail = torch.sigmoid(lower[:, 0, :1]) + torch.sigmoid(-upper[:, 0, -1:])
        cdf = torch.zeros((self.channels, max_length + 2), dtype=torch.int32)
        lengths = pmf_length.tolist()
        for c in range(self.channels):
            prob = torch.cat((pmf[c, :lengths[c]], tail[c])).tolist()
            row = pmf_to_quantized_cdf(prob, self.entropy_coder_precision)
            cdf[c, :len(row)] = torch.tensor(row, dtype=torch.int32)
        self._offset = (-minima).to(torch.int32)
        self._quantized_cdf = cdf.to(med.device)
        self._cdf_length = (pmf_length + 2).to(torch.int32)
        return True

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, filters={self.filters}, init_scale={self.init_scale}, "
                f"tail_mass={self.tail_mass}, backend={self.backend or 'default'}")


class EntropyBottleneck(FactorizedDensity):
    """Factorized entropy bottleneck (Balle et al.), CompressAI-compatible.

    Args:
        channels: C, the channel dim (dim 1) of the inputs.
        filters: hidden widths of each channel's cumulative-logit MLP.
        init_scale, tail_mass: CompressAI's initialisation and quantile targets.
        likelihood_bound: lower bound of the likelihoods (0 disables).
        backend: ``auto|cuda|triton|cpu|reference`` (default ``$CIFD_BACKEND``/auto):
            the ``cifd::entropy_bottleneck`` kernels (C++ CPU, CUDA, Triton) where they
            apply, else the eager reference; a named backend that cannot run raises
            :class:`cifd_kernels.BackendUnavailableError`.

    ``forward(y)`` returns ``(y_hat, likelihoods)``: y [B, C, *spatial] or [B, C],
    any floating dtype and strides; y_hat in y's dtype, likelihoods in float32
    (float64 for float64 inputs or parameters). ``rate(likelihoods)`` gives nats
    per sample, ``loss()`` the auxiliary quantile loss.
    """

    def forward(self, y: torch.Tensor, training: Optional[bool] = None, seed: Optional[int] = None,
                offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
            y: [B, C, *spatial] or [B, C].
            training: None = ``self.training``. True: ``y_hat = y + u``, Philox noise
                (counter ``offset + i``, ``i`` row-major in y); False:
                ``y_hat = round(y - median) + median``.
            seed: Philox seed (Python int, or a 0-dim int64 CPU tensor); None draws one
                with :func:`cifd_kernels.reference.philox.draw_seed` (torch's CPU
                generator; under ``torch.compile`` drawn in the graph: no graph break).
            offset: first Philox counter.

        Empty batches give empty outputs; NaN in y propagates (no host check).
        """
        if training is None:
            training = self.training
        self._check_input("y", y)
        mats, bias, facs = self._params()
        if training:
            if seed is None:
                seed = draw_seed()
            out = _eb_op(y, mats, bias, facs, None, "noise", seed, offset,
                                          bound=self.likelihood_bound, need_likelihood=True,
                                          deterministic=self.deterministic, backend=self.backend)
        else:
            out = _eb_op(y, mats, bias, facs, self.medians(), "dequantize",
                                          bound=self.likelihood_bound, need_likelihood=True,
                                          deterministic=self.deterministic, backend=self.backend)
        return out.y_hat, out.likelihood

    def likelihood(self, y_hat: torch.Tensor) -> torch.Tensor:
        """Bounded likelihoods of already-quantized values ``y_hat`` [B, C, *]."""
        self._check_input("y_hat", y_hat)
        return _ref.likelihood(y_hat, *self._params(), bound=self.likelihood_bound)


__all__ = ["EntropyBottleneck", "FactorizedDensity"]
