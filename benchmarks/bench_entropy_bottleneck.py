# SPDX-License-Identifier: Apache-2.0
"""The factorized entropy model in training (noise) mode: fwd, bwd, full.

Providers:

* ``compressai``: CompressAI's ``EntropyBottleneck`` (the baseline; torch's own
  uniform noise);
* ``reference``: :func:`cifd_kernels.reference.entropy_bottleneck.entropy_bottleneck`
  (eager, Philox noise), on the same parameter values as CompressAI's;
* ``compiled``: ``torch.compile(dynamic=True)`` of the reference with its noise
  drawn by the ``cifd::philox_uniform`` op (fastest backend here; a custom op
  that Inductor calls, not inlines) and added before the reference's
  ``mode="none"`` path: the same values as the reference's ``noise`` mode.
  Compiling the reference's own int64 Philox does not finish: Inductor spends
  > 15 min lowering it (torch 2.14, 49k elements, CPU), so it is kept out;
  ``dynamic=True`` so that the shapes share two graphs (2-D, 4-D) instead of
  compiling one each (compiles cost ~20 s each on a 2-core CPU);
* ``cpu`` / ``cuda`` / ``triton``: :class:`cifd_kernels.nn.EntropyBottleneck`
  with that backend, loaded from CompressAI's state dict; skipped until the op
  registers kernels for the backend.

Modes (see :func:`benchmarks.utils.mode_fn`): ``fwd`` is the training forward
with autograd recording; ``bwd`` times only ``torch.autograd.grad`` of both
outputs ``(y_hat, likelihoods)`` with fixed random ``grad_outputs``, i.e. of
the random-weighted sum ``<g1, y_hat> + <g2, likelihoods>``, with respect to
``y`` and every density parameter; ``full`` is fwd + that backward.
"""
from __future__ import annotations

import functools
import importlib

import pytest
import torch

from benchmarks.utils import numel, run_modes, shape_id
from cifd_kernels import ops
from cifd_kernels.reference import entropy_bottleneck as ref

OP = "entropy_bottleneck"
SEED = 0x5EED
SHAPES = ((256, 192), (4096, 512), (65536, 320), (16, 192, 16, 16))  # (B, C) and a CompressAI latent
BIG = {(65536, 320)}  # 21M elements: GPU, or CPU with CIFD_BENCH_FULL=1
PROVIDERS = ("compressai", "reference", "compiled", "cpu", "cuda", "triton")
MODES = ("fwd", "bwd", "full")
DTYPES = (torch.float32,)

try:  # kernels register their backends for the op when their ops module is imported
    importlib.import_module("cifd_kernels.ops.entropy_bottleneck")
except ModuleNotFoundError as e:
    if e.name != "cifd_kernels.ops.entropy_bottleneck":
        raise


def _reference_with_op_noise(y, matrices, biases, factors, seed: int, offset: int):
    """The reference in noise mode, its Philox noise from the cifd::philox_uniform op.

    Equal to ``ref.entropy_bottleneck(y, ..., "noise", seed, offset)`` for float32
    ``y``: same noise bits, ``y + u`` rounded once, then the same density."""
    u = ops.philox_uniform(tuple(y.shape), seed, offset, device=y.device) - 0.5
    return ref.entropy_bottleneck(y + u.to(y.dtype), matrices, biases, factors, None, "none")


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(_reference_with_op_noise, dynamic=True)


def _bytes(mode: str, n: int, p: int, elt: int) -> int:
    """Minimal traffic: inputs read once, outputs written once.

    n = numel(y), p = number of density parameters, elt = bytes per element of
    y (likelihoods and parameters are float32: 4). Noise is regenerated from
    (seed, offset), never read.
      fwd:  read y, params;                      write y_hat, lik
      bwd:  read y, params, grad_y_hat, grad_lik; write grad_y, grad_params
      full: fwd + bwd
    """
    fwd = n * elt + 4 * p + n * elt + 4 * n
    bwd = n * elt + 4 * p + n * elt + 4 * n + n * elt + 4 * p
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def _setup(provider: str, shape, dtype, device):
    """(forward callable, leaf tensors that get gradients, number of parameters).

    Every provider gets the same parameter values: CompressAI's initialisation as
    our module draws it (seeded), loaded into CompressAI's module for its row, so
    only the ``compressai`` provider needs CompressAI installed.
    """
    from cifd_kernels.nn.entropy_bottleneck import EntropyBottleneck

    C = shape[1]
    torch.manual_seed(0)
    base = EntropyBottleneck(C).to(device).train()
    y = (3.0 * torch.randn(shape, generator=torch.Generator().manual_seed(1))).to(device, dtype)
    y.requires_grad_(True)
    n_params = sum(t.numel() for g in (base.matrices, base.biases, base.factors) for t in g)

    if provider == "compressai":
        try:
            from compressai.entropy_models import EntropyBottleneck as CompressAIEB
        except Exception as e:  # noqa: BLE001 - any import failure means "not here"
            pytest.skip(f"compressai not importable: {e}")
        eb = CompressAIEB(C).to(device).train()
        eb.load_state_dict(base.state_dict())
        params = [*eb.matrices, *eb.biases, *eb.factors]
        return (lambda: eb(y, training=True)), [y, *params], n_params

    if provider in ("reference", "compiled"):
        mats, biases, facs = ([t.detach().clone().requires_grad_(True) for t in g]
                              for g in (base.matrices, base.biases, base.factors))
        if provider == "reference":
            def forward():
                return ref.entropy_bottleneck(y, mats, biases, facs, None, "noise", SEED, 0)
        else:
            compiled = _compiled()

            def forward():
                return compiled(y, mats, biases, facs, SEED, 0)

        return forward, [y, *mats, *biases, *facs], n_params

    m = EntropyBottleneck(C, backend=provider).to(device).train()
    m.load_state_dict(base.state_dict())
    params = [*m.matrices, *m.biases, *m.factors]
    return (lambda: m(y, training=True, seed=SEED)), [y, *params], n_params


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("mode", MODES)
def test_entropy_bottleneck(bench, mode, shape, provider, dtype):
    bench.require(provider, OP)
    if shape in BIG:
        bench.require_big(f"shape {shape_id(shape)}")
    forward, leaves, n_params = _setup(provider, shape, dtype, bench.device)
    elt = torch.empty((), dtype=dtype).element_size()
    run_modes(bench, op=OP, provider=provider, shape=shape, mode=mode, dtype=dtype, forward=forward,
              leaves=leaves, bytes_moved=_bytes(mode, numel(shape), n_params, elt),
              baseline="compressai")
