# SPDX-License-Identifier: Apache-2.0
"""cifd_kernels: fused kernels and modules for CIFD knowledge distillation.

Importing needs only torch: Triton and the compiled extension ``_C`` are loaded
when a backend that needs them is chosen (``python -m cifd_kernels info``).
"""
__version__ = "0.1.0"

from . import backend, ops, reference  # noqa: F401,E402
from .backend import BackendUnavailableError  # noqa: F401,E402


def __getattr__(name):
    # cifd_kernels.RDM etc. resolve to cifd_kernels.nn.RDM on first use.
    import importlib
    _nn = importlib.import_module(".nn", __name__)
    if name in _nn.__all__:
        return getattr(_nn, name)
    raise AttributeError(f"module 'cifd_kernels' has no attribute {name!r}")
