# SPDX-License-Identifier: Apache-2.0
"""Test configuration.

* Without a CUDA device, Triton kernels run under ``TRITON_INTERPRET=1`` (set
  here before any Triton kernel is defined) on CPU tensors.
* ``@pytest.mark.gpu`` tests (and the ``device`` fixture's "cuda" value) skip
  without a GPU; ``CIFD_REQUIRE_GPU=1`` turns those skips into failures.
* ``fake_dir``: a tiny synthetic Fashion-MNIST (200 train, 60 test images) for
  the training tests, written once per session.
"""
import os

import pytest

from helpers import require_gpu_or_skip


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def pytest_configure(config):
    if "TRITON_INTERPRET" not in os.environ and not _has_cuda():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _gpu_marker(request):
    if request.node.get_closest_marker("gpu") is not None:
        require_gpu_or_skip()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """Each test that takes ``device`` runs on the CPU and, when there is one, a GPU."""
    return request.param


@pytest.fixture(autouse=True)
def _keep_threads():
    """Commands under test may call torch.set_num_threads (the CLI's --threads): put it back."""
    import torch
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _keep_kernel_options():
    """Tests may call backend.set_kernel_options: put the options back (the _C side too)."""
    import dataclasses

    from cifd_kernels import backend
    old = backend.get_kernel_options()
    yield
    if backend.get_kernel_options() != old:
        backend.set_kernel_options(**dataclasses.asdict(old))


@pytest.fixture(scope="session")
def fake_dir(tmp_path_factory):
    """A directory holding a synthetic Fashion-MNIST (the four IDX files, 200
    training and 60 test images) that small CNNs learn in an epoch or two."""
    from cifd_kernels.training import data
    return data.write_synthetic_fashion_mnist(tmp_path_factory.mktemp("fmnist"), 200, 60)
