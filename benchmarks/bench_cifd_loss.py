# SPDX-License-Identifier: Apache-2.0
"""The stage-2 CIFD student loss (docs/METHOD.md section 4): fwd and full.

Providers:

* ``eager``: the loss written the obvious way, a Python loop over the M targets
  calling the reference's per-sample functions (``kl_tau``, ``distortion``,
  ``cross_entropy``) and summing their batch means (the baseline);
* ``reference``: :func:`cifd_kernels.reference.cifd_loss.cifd_loss` (batched over M);
* ``compiled``: ``torch.compile`` of the eager sum, its keep flags drawn outside the
  graph (Inductor does not finish compiling the reference's in-graph Philox arithmetic);
* ``cpu`` / ``cuda`` / ``triton``: :func:`cifd_kernels.ops.cifd_loss.cifd_loss` with
  that backend (one fused pass that also writes the gradients); skipped where the
  op has no such kernels or they cannot run here (Triton: CUDA GPUs only).

Shape (M, B, K, D) = (4, 1024, 1000, 512): teacher + 3 RDMs, ImageNet-sized K.
Every provider draws the same keep flags (p_drop = 0.25, fixed seed), and the
gradient is taken with respect to the student's logits and embedding only (the
targets are frozen). Modes (see :func:`benchmarks.utils.mode_fn`): ``fwd`` the
training forward, ``full`` forward + backward with a random ``grad_output``.
"""
from __future__ import annotations

import functools
import importlib

import pytest
import torch

from benchmarks.utils import run_modes, shape_id
from cifd_kernels.reference import cifd_loss as ref

OP = "cifd_loss"
SEED = 0x5EED
SHAPES = ((4, 1024, 1000, 512),)  # (M, B, K, D)
PROVIDERS = ("eager", "reference", "compiled", "cpu", "cuda", "triton")
MODES = ("fwd", "full")
DTYPES = (torch.float32,)
HP = dict(tau=2.0, p_drop=0.25, seed=SEED, offset=0, lam_ce=1.0, lam_kl=1.0, w_emb=100.0, dist="mse",
          lam_I=0.005, ignore_index=-100)

try:  # kernels register their backends for the op when their ops module is imported
    ops = importlib.import_module("cifd_kernels.ops.cifd_loss")
except ModuleNotFoundError as e:
    if e.name != "cifd_kernels.ops.cifd_loss":
        raise
    ops = None


def _eager(z, t, y, u, x, lam, rate):
    """Sum of per-target losses, one target at a time, from the reference's per-sample functions."""
    keep = ref.kd_keep_flags(t.shape[0], HP["seed"], HP["offset"], HP["p_drop"], device=z.device)
    return _eager_with_keep(z, t, y, u, x, lam, rate, keep)


def _eager_with_keep(z, t, y, u, x, lam, rate, keep):
    loss = HP["lam_ce"] * ref.cross_entropy(z, y, HP["ignore_index"]).mean()
    for m in range(t.shape[0]):
        per_target = (HP["lam_kl"] * ref.kl_tau(t[m], z, HP["tau"]).mean()
                      + HP["w_emb"] * ref.distortion(u, x[m], HP["dist"]).mean())
        loss = loss + torch.where(keep[m], lam[m] * per_target, 0.0)
    return loss + HP["lam_I"] * rate.mean()


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(_eager_with_keep)


def _bytes(mode: str, M: int, B: int, K: int, D: int, elt: int) -> int:
    """Minimal traffic: fwd reads the student's and the M targets' logits and embeddings
    (labels, rate: 8B + 4B) and writes the [B, K] and [B, D] gradients it keeps; full adds
    reading them once and writing the scaled gradients."""
    fwd = (M + 1) * B * (K + D) * elt + 12 * B + B * (K + D) * elt
    return {"fwd": fwd, "full": fwd + 2 * B * (K + D) * elt}[mode]


def _setup(provider: str, shape, dtype, device):
    M, B, K, D = shape
    g = torch.Generator().manual_seed(1)
    z = (3 * torch.randn(B, K, generator=g)).to(device, dtype).requires_grad_()
    t = (3 * torch.randn(M, B, K, generator=g)).to(device, dtype)
    y = torch.randint(0, K, (B,), generator=g).to(device)
    u = torch.randn(B, D, generator=g).to(device, dtype).requires_grad_()
    x = torch.randn(M, B, D, generator=g).to(device, dtype)
    rate = torch.rand(B, generator=g).to(device)
    lam = [1.0] * M
    if provider == "eager":
        lam_t = torch.tensor(lam, device=device)
        return (lambda: _eager(z, t, y, u, x, lam_t, rate)), [z, u]
    if provider == "compiled":
        lam_t = torch.tensor(lam, device=device)
        keep = ref.kd_keep_flags(M, HP["seed"], HP["offset"], HP["p_drop"], device=device)
        fn = _compiled()
        return (lambda: fn(z, t, y, u, x, lam_t, rate, keep)), [z, u]
    if provider == "reference":
        return (lambda: ref.cifd_loss(z, t, y, u, x, lam, ibm_rate=rate, **HP)[0]), [z, u]
    return (lambda: ops.cifd_loss(z, t, y, u, x, lam, ibm_rate=rate, backend=provider, **HP)[0]), [z, u]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("mode", MODES)
def test_cifd_loss(bench, mode, shape, provider, dtype):
    if provider not in ("eager", "reference"):
        bench.require(provider, OP if provider != "compiled" else None)
    forward, leaves = _setup(provider, shape, dtype, bench.device)
    elt = torch.empty((), dtype=dtype).element_size()
    run_modes(bench, op=OP, provider=provider, shape=shape, mode=mode, dtype=dtype, forward=forward,
              leaves=leaves, bytes_moved=_bytes(mode, *shape, elt), baseline="eager")
