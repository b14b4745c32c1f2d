# SPDX-License-Identifier: Apache-2.0
"""``IBM``: the student-side Information Bottleneck Module (docs/METHOD.md sec. 3).

Its density parameters use CompressAI's EntropyBottleneck layout
(``matrices.k``, ``biases.k``, ``factors.k``, ``quantiles``, ``target``), so an
EntropyBottleneck state dict (ours or CompressAI's) loads into it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..reference import _checks
from ..ops.ibm import ibm as _ibm_op
from ..reference.philox import draw_seed
from .entropy_bottleneck import FactorizedDensity


class IBM(FactorizedDensity):
    """``w_hat = m * (w + s*u)`` with rate ``-sum_c m_c ln p_c(w_hat_c / s)`` (nats), training only.

    The density is read at ``w_hat / s``, where the noise has unit width, so the rate
    stays the information bound of the channel actually used: ``IBM_s(w) = s *
    IBM_1(w / s)`` (docs/METHOD.md section 3). ``s`` rescales the channel to an
    embedding's scale; it does not weaken the bottleneck (that is the rate weight's job).

    Args:
        channels: D_s, the embedding width (dim 1 of the input).
        rho: drop probability of the keep mask m, in [0, 1] (0 = the paper's IBM, no mask).
        s: noise scale, finite and > 0 (1 = the paper's).
        filters, init_scale, tail_mass, likelihood_bound: the density, as
            :class:`cifd_kernels.nn.EntropyBottleneck`.
        backend: as :class:`cifd_kernels.nn.EntropyBottleneck` (the IBM runs the
            ``entropy_bottleneck`` op in noise mode: :func:`cifd_kernels.ops.ibm`).

    ``forward(w)`` returns ``(w_hat, rate)``; in eval mode ``(w, zeros[B])``: the
    IBM is removed at inference. The last keep mask is not stored (backward
    passes regenerate it from seed and offset); call
    :func:`cifd_kernels.reference.ibm.ibm` to get it.
    """


    def __init__(self, channels: int, rho: float = 0.0, s: float = 1.0, filters: Sequence[int] = (3, 3, 3, 3),
                 init_scale: float = 10.0, tail_mass: float = 1e-9, likelihood_bound: float = 1e-9,
                 backend: Optional[str] = None, deterministic: bool = False):
        _checks.check_rho_s(rho, s)
        super().__init__(channels, filters, init_scale, tail_mass, likelihood_bound, backend,
                         deterministic=deterministic)
        self.rho = float(rho)
        self.s = float(s)

    def forward(self, w: torch.Tensor, seed: Optional[int] = None, offset: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
            w: student embedding [B, C] (or [B, C, *spatial]), floating, any strides.
            seed: Philox seed (Python int, or a 0-dim int64 CPU tensor); None draws one
                with :func:`cifd_kernels.reference.philox.draw_seed` (under
                ``torch.compile`` drawn in the graph: no graph break). Unused in eval mode.
            offset: first Philox counter; element i (row-major) uses offset + i.

        Returns:
            ``(w_hat, rate)``: w_hat in w's dtype and shape; rate [B] in nats,
            float32 (float64 for float64 inputs or parameters). Empty batches give
            empty outputs; NaN in w propagates to that sample's w_hat and rate.
        """
        self._check_input("w", w)
        if self.training and seed is None:
            seed = draw_seed()
        # not training: the IBM is removed (w, zeros[B]); no seed drawn
        return _ibm_op(w, *self._params(), rho=self.rho, s=self.s, seed=0 if seed is None else seed, offset=offset,
                       training=self.training, bound=self.likelihood_bound,
                       deterministic=self.deterministic, backend=self.backend)

    def extra_repr(self) -> str:
        return f"rho={self.rho}, s={self.s}, " + super().extra_repr()


__all__ = ["IBM"]
