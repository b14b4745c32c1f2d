# SPDX-License-Identifier: Apache-2.0
"""Drop-in modules. Loaded on first use so that ``import cifd_kernels`` stays light."""
import importlib

_LAZY = {
    "EntropyBottleneck": ".entropy_bottleneck",
    "IBM": ".ibm",
    "RDM": ".rdm",
    "RDMBank": ".rdm",
    "CIFDLoss": ".cifd_loss",
    "CIFDEmbeddingLoss": ".cifd_loss",
}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
