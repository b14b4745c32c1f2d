# SPDX-License-Identifier: Apache-2.0
"""``ibm``: the Information Bottleneck Module as a function (docs/METHOD.md section 3).

``w_hat = m * (w + s u)`` with the rate ``-sum_c m_c ln p_c(w_hat_c / s)``, in
training; ``(w, 0)`` at inference. Training runs the entropy op in noise mode
(``cifd::entropy_bottleneck``: one kernel each way on every backend); inference
is the identity and runs no kernel. :class:`cifd_kernels.nn.IBM` holds the
density parameters and calls this.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..reference import ibm as _ref_ibm
from .entropy_bottleneck import entropy_bottleneck


def ibm(w: torch.Tensor, matrices: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
        factors: Sequence[torch.Tensor], *, rho: float = 0.0, s: float = 1.0, seed: int = 0,
        offset: int = 0, training: bool = True, bound: float = 1e-9, deterministic: bool = False,
        backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Args: as :func:`cifd_kernels.reference.ibm.ibm` (``w`` [B, C] or [B, C, *spatial],
    the CompressAI-layout density parameters, ``rho`` in [0, 1], ``s`` > 0, the Philox
    ``seed`` and ``offset``, ``training``, ``bound``), plus ``deterministic`` and
    ``backend`` as :func:`cifd_kernels.ops.entropy_bottleneck`.

    Returns ``(w_hat, rate)``: w_hat in w's dtype and shape, rate [B] in nats
    (float32; float64 for float64 inputs), the reference's bits for y_hat on every
    backend. Not training: ``(w, zeros[B])``, checked as in training.
    """
    if not training:
        w_hat, rate, _ = _ref_ibm.ibm(w, matrices, biases, factors, rho=rho, s=s, training=False,
                                      bound=bound)
        return w_hat, rate
    out = entropy_bottleneck(w, matrices, biases, factors, None, "noise", seed, offset, rho=rho, s=s,
                             bound=bound, deterministic=deterministic, backend=backend, _name="w")
    return out.y_hat, out.rate
