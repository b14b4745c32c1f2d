# SPDX-License-Identifier: Apache-2.0
"""Shared test helpers: GPU requirement and backend availability."""
import os

import pytest


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def require_gpu_or_skip(why: str = "needs a CUDA GPU") -> None:
    if _has_cuda():
        return
    if os.environ.get("CIFD_REQUIRE_GPU", "0") == "1":
        pytest.fail(f"CIFD_REQUIRE_GPU=1 but no CUDA GPU is visible ({why})")
    pytest.skip(why)


def backend_or_skip(name: str, device: str) -> None:
    """Skip unless ``name`` can run on ``device`` here (an unavailable C++ build is
    a skip only when CIFD_BUILD_EXT=0 was chosen; otherwise it is a failure)."""
    from cifd_kernels import backend
    ok, why = backend.status(name, device)
    if ok:
        return
    if name in ("cpu", "cuda") and "not importable" in why and os.environ.get("CIFD_BUILD_EXT") != "0":
        pytest.fail(f"backend {name!r} unavailable: {why}")
    if name == "cuda" and device == "cuda" and os.environ.get("CIFD_REQUIRE_GPU") == "1":
        pytest.fail(f"CIFD_REQUIRE_GPU=1 but backend cuda is unavailable: {why}")
    pytest.skip(f"backend {name!r} unavailable on {device}: {why}")


def seeded_randn(*shape, seed=0, scale=1.0, dtype=None, grad=False):
    """A float64 normal draw from its own generator, cast to ``dtype`` (default float64)."""
    import torch
    t = scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return t.to(dtype or torch.float64).requires_grad_(grad)


def perturbed_compressai_eb(C=5, seed=0, dtype=None, quantiles=True, **kw):
    """A CompressAI EntropyBottleneck whose parameters are far from the init (as after
    training); with ``quantiles``, its quantiles are perturbed (and kept sorted) too."""
    import torch
    from compressai.entropy_models import EntropyBottleneck as CEB
    torch.manual_seed(seed)
    ceb = CEB(C, **kw)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in ceb.matrices:
            p.add_(0.4 * torch.randn(p.shape, generator=g))
        for p in ceb.biases:
            p.add_(0.5 * torch.randn(p.shape, generator=g))
        for p in ceb.factors:
            p.copy_(torch.randn(p.shape, generator=g))
        if quantiles:
            q = ceb.quantiles + torch.randn(ceb.quantiles.shape, generator=g)
            ceb.quantiles.copy_(torch.sort(q, dim=-1).values)
    return ceb.to(dtype or torch.float64)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention (gradcheck makes thousands of
    calls). Use as ``_one_thread = pytest.fixture(autouse=True, scope="module")(...)``
    or request it; restores the thread count afterwards."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
