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
