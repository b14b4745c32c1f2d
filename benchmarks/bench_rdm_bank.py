# SPDX-License-Identifier: Apache-2.0
"""The RDM bank, stage 1 (docs/METHOD.md section 2): N RDMs on one teacher
embedding, training forward (``fwd``) and forward + backward (``full``) of the
whole stage-1 loss (distortion, rate, CE, tau^2 KL), gradients to every parameter.

Providers:

* ``eager``: N separate eager RDM modules, the way one writes them by hand:
  ``nn.Linear`` layers, CompressAI's ``EntropyBottleneck`` (its own uniform
  noise), and the four loss terms; a Python loop over the RDMs (the baseline);
* ``reference``: :func:`cifd_kernels.reference.rdm.rdm_bank_forward` +
  ``rdm_bank_loss`` (stacked parameters, batched over N);
* ``compiled``: ``torch.compile`` of the reference bank, its Philox noise drawn by
  the ``cifd::philox_uniform`` op (Inductor does not finish compiling the
  reference's in-graph Philox arithmetic; same bits);
* ``cpu`` / ``cuda`` / ``triton``: the ``RDMBank`` module with that backend (the
  fused bank, :mod:`cifd_kernels.ops.rdm_bank`).

Shapes (N, B, D, H, L, K): the paper's ImageNet bank (3, 1024, 512, 512, 512, 1000)
and a CIFAR-100-sized bank (3, 256, 256, 256, 256, 100).
"""
from __future__ import annotations

import functools
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.utils import run_modes, shape_id
from cifd_kernels.reference import entropy_bottleneck as ref_eb
from cifd_kernels.reference import rdm as ref

OP = "rdm_bank"
SEED = 0x5EED
SHAPES = ((3, 1024, 512, 512, 512, 1000), (3, 256, 256, 256, 256, 100))  # (N, B, D, H, L, K)
PROVIDERS = ("eager", "reference", "compiled", "cpu", "cuda", "triton")
MODES = ("fwd", "full")
DTYPES = (torch.float32,)
R = (10.0, 1.0, 0.3)
HP = dict(dist="mse", lam_ce=1.0, lam_kl=1.0, tau=2.0)

try:  # kernels register their backends for the op when their ops module is imported
    importlib.import_module("cifd_kernels.ops.rdm_bank")
except ModuleNotFoundError as e:
    if e.name != "cifd_kernels.ops.rdm_bank":
        raise
from cifd_kernels import ops  # noqa: E402


class _EagerRDM(nn.Module):
    """One RDM written by hand: Linear layers, CompressAI's entropy bottleneck."""

    def __init__(self, D, H, L, K):
        super().__init__()
        from compressai.entropy_models import EntropyBottleneck as CompressAIEB
        self.enc = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, L))
        self.eb = CompressAIEB(L)
        self.dec = nn.Sequential(nn.Linear(L, H), nn.ReLU(), nn.Linear(H, D))
        self.head = nn.Linear(D, K)

    def forward(self, x, t, y, r):
        z = self.enc(x)
        z_hat, lik = self.eb(z, training=True)
        x_hat = self.dec(z_hat)
        v = self.head(x_hat)
        dist = (x_hat - x).pow(2).sum(-1).mean()
        rate = -torch.log(lik).sum(-1).mean()
        ce = F.cross_entropy(v, y)
        tau = HP["tau"]
        kl = F.kl_div(F.log_softmax(v / tau, -1), F.log_softmax(t / tau, -1), log_target=True,
                      reduction="batchmean") * tau * tau
        return r * dist + rate + HP["lam_ce"] * ce + HP["lam_kl"] * kl


def _reference_bank(x, t, y, p, mats, biases, facs):
    out = ref.rdm_bank_forward(x, p, mats, biases, facs, act="relu", mode="noise", seed=SEED)
    return ref.rdm_bank_loss(x, out.x_hat, out.logits, out.rate, list(R), y, t, **HP)[0]


def _reference_bank_op_noise(x, t, y, p, mats, biases, facs):
    """The reference bank with its noise from cifd::philox_uniform (same bits)."""
    act = torch.relu
    z = ref._linear(act(ref._linear(x, p["enc1.weight"], p["enc1.bias"])), p["enc2.weight"], p["enc2.bias"])
    u = ops.philox_uniform(tuple(z.shape), SEED, 0, device=z.device) - 0.5
    z_hat = z + u
    x_hat = ref._linear(act(ref._linear(z_hat, p["dec1.weight"], p["dec1.bias"])), p["dec2.weight"],
                        p["dec2.bias"])
    logits = ref._linear(x_hat, p["head.weight"], p["head.bias"])
    lik = ref.latent_likelihood(z_hat, mats, biases, facs)
    n, b, l = z.shape
    rate = ref_eb.rate_nats(lik.reshape(n * b, l)).reshape(n, b)
    return ref.rdm_bank_loss(x, x_hat, logits, rate, list(R), y, t, **HP)[0]


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(_reference_bank_op_noise)


def _bytes(mode: str, N: int, B: int, D: int, H: int, L: int, K: int, elt: int) -> int:
    """Minimal traffic: x, teacher logits and the parameters read once; the bank's
    outputs that training keeps (latent, reconstruction, logits) written once. full
    adds reading them back and writing every parameter's gradient."""
    params = N * (D * H + H * L + L * H + H * D + D * K + 2 * H + L + D + K + 58 * L)
    fwd = (B * D + B * K + params) * elt + N * B * (L + D + K) * elt
    return {"fwd": fwd, "full": 2 * fwd + params * elt}[mode]


def _setup(provider: str, shape, dtype, device):
    N, B, D, H, L, K = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, D, generator=g).to(device, dtype)
    t = (3 * torch.randn(B, K, generator=g)).to(device, dtype)
    y = torch.randint(0, K, (B,), generator=g).to(device)
    if provider == "eager":
        try:
            mods = nn.ModuleList([_EagerRDM(D, H, L, K) for _ in range(N)]).to(device, dtype)
        except ImportError as e:
            pytest.skip(f"compressai not importable: {e}")
        leaves = [p for m in mods for n_, p in m.named_parameters() if "quantiles" not in n_]
        return (lambda: sum(m(x, t, y, r) for m, r in zip(mods, R))), leaves
    from cifd_kernels.nn.rdm import RDMBank
    torch.manual_seed(0)
    bank = RDMBank(N, D, H, L, K, R=R, backend=None if provider in ("reference", "compiled") else provider,
                   **HP).to(device, dtype).train()
    leaves = [p for n_, p in bank.named_parameters() if "quantiles" not in n_]
    if provider in ("reference", "compiled"):
        p = bank._stacked()
        eb = bank.entropy_bottleneck
        mats, biases, facs = list(eb.matrices), list(eb.biases), list(eb.factors)
        fn = _reference_bank if provider == "reference" else _compiled()
        return (lambda: fn(x, t, y, p, mats, biases, facs)), leaves
    return (lambda: bank(x, t, y, seed=SEED).loss), leaves


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("mode", MODES)
def test_rdm_bank(bench, mode, shape, provider, dtype):
    if provider not in ("eager", "reference"):
        bench.require(provider, OP if provider != "compiled" else None)
    forward, leaves = _setup(provider, shape, dtype, bench.device)
    elt = torch.empty((), dtype=dtype).element_size()
    run_modes(bench, op=OP, provider=provider, shape=shape, mode=mode, dtype=dtype, forward=forward,
              leaves=leaves, bytes_moved=_bytes(mode, *shape, elt), baseline="eager")
