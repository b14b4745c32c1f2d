# SPDX-License-Identifier: Apache-2.0
"""Information Bottleneck Module (IBM) on the student embedding: the eager oracle.

docs/METHOD.md section 3, training only::

    w_hat  = m * (w + s*u),   u = Philox word 0 of counter offset+i, minus 1/2
                              m = (uniform(word 1 of the same counter) >= rho)
    rate_I = -sum_c m_c ln p_c(w_hat_c / s)  # nats, per sample; p as in section 1

The density is read at ``w_hat / s``, in the units where the noise has unit
width, so ``rate_I`` is the information bound of the channel actually used:
``IBM_s(w) = s * IBM_1(w / s)`` (same noise bits). At ``s = 1`` (the paper's)
the division is exact and changes nothing.

Order of operations, which every backend reproduces bit for bit: in the compute
dtype (float32, float64 for float64 inputs) ``t = s * u`` first, then
``w + t``; dropped elements are then *selected* to +0.0 (a select, not a
multiply, so there is no -0.0 and a NaN/inf in a dropped element does not leak
through). ``w_hat`` is cast to ``w.dtype`` last; the likelihood is evaluated at
the compute-dtype value divided by ``s`` (one IEEE division). Gradients reach
kept elements only: ``grad_w = m * (grad_w_hat + (d rate / d x) / s)``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .entropy_bottleneck import (_from_channel_rows, _likelihood_rows, _to_channel_rows, check_activation,
                                 check_params, compute_dtype)
from ._checks import check_rho_s
from .philox import philox_words, uint_to_uniform


def ibm(w: torch.Tensor, matrices: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
        factors: Sequence[torch.Tensor], rho: float = 0.0, s: float = 1.0, seed: int = 0, offset: int = 0,
        training: bool = True, bound: float = 1e-9
        ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Masked noisy bottleneck and its rate.

    Args:
        w: student embedding [B, C] (or [B, C, *spatial]), floating, any strides.
        matrices, biases, factors: CompressAI-layout density parameters
            (:mod:`.entropy_bottleneck`) with C channels, on ``w``'s device.
        rho: drop probability in [0, 1] (0 = the paper's IBM, no mask).
        s: noise scale, finite and > 0 (1 = the paper's); the density is read at
            ``w_hat / s``.
        seed, offset: Philox seed and base counter (Python ints in [0, 2**63));
            element ``i`` (row-major in ``w``'s logical shape) uses counter
            ``offset + i``: word 0 for its noise, word 1 for its keep flag.
        training: False removes the IBM (inference): returns ``(w, zeros[B], None)``.
        bound: likelihood lower bound (CompressAI's LowerBound rule).

    Returns:
        ``(w_hat, rate, keep)``: ``w_hat`` in ``w.dtype`` and shape (contiguous);
        ``rate`` [B] in nats in the compute dtype (float32, float64 for float64),
        ``-sum over kept elements of ln p(w_hat / s)``; ``keep`` bool of ``w``'s shape
        (all True for rho = 0), or None when not training.
    """
    C = check_params(matrices, biases, factors)
    check_activation("w", w, C, matrices[0].device)
    check_rho_s(rho, s)
    cdt = compute_dtype(w.dtype, matrices[0].dtype)
    if not training:
        return w, torch.zeros(w.shape[0], dtype=cdt, device=w.device), None
    w0, w1, _, _ = philox_words(w.numel(), seed, offset, device=w.device)
    u = (uint_to_uniform(w0) - 0.5).reshape(w.shape)  # float32, = philox_noise
    keep = (uint_to_uniform(w1) >= torch.tensor(float(rho), dtype=torch.float32, device=w.device)
            ).reshape(w.shape)  # = philox_keep_mask
    su = torch.tensor(float(s), dtype=cdt, device=w.device) * u.to(cdt)  # s*u first, then + w
    wh = torch.where(keep, w.to(cdt) + su, torch.zeros((), dtype=cdt, device=w.device))
    x = wh if float(s) == 1.0 else wh / torch.tensor(float(s), dtype=cdt, device=w.device)
    p = _from_channel_rows(_likelihood_rows(_to_channel_rows(x), matrices, biases, factors, bound, cdt),
                           w.shape)
    nll = torch.where(keep, -torch.log(p), torch.zeros((), dtype=cdt, device=w.device))
    rate = nll.flatten(1).sum(1)
    return wh.to(w.dtype).contiguous(), rate, keep
