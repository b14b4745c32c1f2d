# SPDX-License-Identifier: Apache-2.0
"""cifd::philox_uniform and cifd::philox_keep_mask, forward only (no gradient).

Providers: ``reference`` (eager int64 Philox, the baseline), the ``cpu``,
``cuda`` and ``triton`` backends, and ``torch``: torch's own generator
(``torch.rand`` / ``bernoulli_``), a speed-of-light row that draws different
bits and is not a provider of this op.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.utils import numel as _numel
from cifd_kernels import ops

SEED = 0x5EED_CAFE_F00D
OFFSET = 12345
RHO = 0.25
NUMELS = (2**16, 2**22, 2**26)
BIG = 2**26  # GPU-sized: 64M counters, several GB of int64 temporaries in the reference
PROVIDERS = ("reference", "torch", "cpu", "cuda", "triton")
OPS = ("philox_uniform", "philox_keep_mask")


def _call(op: str, provider: str, n: int, device: torch.device):
    if provider == "torch":
        if op == "philox_uniform":
            return lambda: torch.rand(n, device=device)
        return lambda: torch.empty(n, dtype=torch.bool, device=device).bernoulli_(1.0 - RHO)
    if op == "philox_uniform":
        return lambda: ops.philox_uniform(n, SEED, OFFSET, device=device, backend=provider)
    return lambda: ops.philox_keep_mask(n, SEED, OFFSET, RHO, device=device, backend=provider)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("n", NUMELS, ids=lambda n: f"n{n}")  # no "^": -k cannot parse it
@pytest.mark.parametrize("op", OPS)
def test_philox(bench, op, n, provider):
    if provider != "torch":
        bench.require(provider, op)
    if n >= BIG:
        bench.require_big(f"numel {n}")
    out_dtype = torch.float32 if op == "philox_uniform" else torch.bool
    # Bytes: no tensor input (seed and offset are scalars); one output written once.
    bytes_moved = _numel((n,)) * torch.empty((), dtype=out_dtype).element_size()
    bench.run(_call(op, provider, n, bench.device), op=op, provider=provider, shape=(n,),
              mode="fwd", dtype=out_dtype, bytes_moved=bytes_moved, baseline="reference")
