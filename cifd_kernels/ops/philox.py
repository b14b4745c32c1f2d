# SPDX-License-Identifier: Apache-2.0
"""``cifd::philox_uniform`` and ``cifd::philox_keep_mask``: counter-based random
numbers, bit-identical on every backend (docs/METHOD.md section 5).

The op takes the concrete backend as a string argument (resolved on the host by
:func:`cifd_kernels.backend.resolve`), so torch.compile traces one op whatever
backend runs it, and the choice costs no host sync.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .. import backend as _backend
from ..reference import philox as _ref
from . import _eager

_OP_UNIFORM = "philox_uniform"
_OP_MASK = "philox_keep_mask"
_backend.register(_OP_UNIFORM, "cuda", "triton", "cpu")
_backend.register(_OP_MASK, "cuda", "triton", "cpu")


def _triton_mod():
    from .._triton import philox as m
    return m


def _philox_uniform_impl(shape: list[int], seed: int, offset: int, device: torch.device,
                       backend: str) -> torch.Tensor:
    if backend == "reference":
        return _ref.philox_uniform(shape, seed, offset, device=device)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    if backend == "triton":
        _triton_mod().philox_uniform(out, seed, offset)
    else:  # cpu / cuda: the compiled kernels, dispatched on out's device
        torch.ops.cifd_C.philox_uniform_out(out, seed, offset)
    return out


_philox_uniform_op = torch.library.custom_op("cifd::philox_uniform", mutates_args=())(_philox_uniform_impl)


@_philox_uniform_op.register_fake
def _(shape, seed, offset, device, backend):
    return torch.empty(shape, dtype=torch.float32, device=device)


def _philox_keep_mask_impl(shape: list[int], seed: int, offset: int, rho: float,
                         device: torch.device, backend: str) -> torch.Tensor:
    if backend == "reference":
        return _ref.philox_keep_mask(shape, seed, offset, rho, device=device)
    out = torch.empty(shape, dtype=torch.bool, device=device)
    if backend == "triton":
        _triton_mod().philox_keep_mask(out, seed, offset, rho)
    else:
        torch.ops.cifd_C.philox_keep_mask_out(out, seed, offset, rho)
    return out


_philox_keep_mask_op = torch.library.custom_op("cifd::philox_keep_mask", mutates_args=())(
    _philox_keep_mask_impl)


@_philox_keep_mask_op.register_fake
def _(shape, seed, offset, rho, device, backend):
    return torch.empty(shape, dtype=torch.bool, device=device)


def _prep(shape, seed, offset, device, op, backend):
    shape = list(_ref._shape(shape))
    _ref.check_seed_offset(seed, offset, math.prod(shape))
    device = torch.device(device) if device is not None else torch.device("cpu")
    be = _backend.resolve(op, backend, device)  # choosing cpu/cuda loaded _C (cifd_C:: ops)
    return shape, device, be


def philox_uniform(shape: Sequence[int] | int, seed: int, offset: int = 0,
                   device: Optional[torch.device | str] = None,
                   dtype: Optional[torch.dtype] = None,
                   backend: Optional[str] = None) -> torch.Tensor:
    """Uniform random numbers in [0, 1), bit-identical to ``tl.rand(seed, offset + i)``.

    Args:
        shape: output shape; element ``i`` in row-major order uses counter ``offset + i``.
        seed: Python int in [0, 2**63); Philox key = (seed low 32 bits, seed high 32 bits).
            Or a 0-dim int64 CPU tensor (:func:`~cifd_kernels.reference.philox.draw_seed`
            under ``torch.compile``): eagerly read at once; while tracing, the reference's
            torch ops draw from it in the graph (the same bits).
        offset: Python int in [0, 2**63), the first counter.
        device: output device (default: the CPU).
        dtype: output dtype (default float32). Values are computed in float32 and
            cast, so float16/bfloat16 outputs are the rounded float32 values.
        backend: ``auto|cuda|triton|cpu|reference`` (default ``$CIFD_BACKEND`` or auto).

    Returns:
        Tensor of ``shape``, ``dtype``, on ``device``. Draws word 0 of each counter.
    """
    shape, device, be = _prep(shape, seed, offset, device, _OP_UNIFORM, backend)
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    seed = _eager.eager_seed(seed)
    if isinstance(seed, torch.Tensor):  # a seed drawn in a traced graph: the reference's torch ops
        return _ref.philox_uniform(shape, seed, offset, device, dtype)
    # eager: the implementation itself (no autograd to attach; see ._eager)
    fn = _philox_uniform_op if _eager.via_ops() else _philox_uniform_impl
    out = fn(shape, seed, offset, device, be)
    return out if dtype in (None, torch.float32) else out.to(dtype)


def philox_keep_mask(shape: Sequence[int] | int, seed: int, offset: int, rho: float,
                     device: Optional[torch.device | str] = None,
                     backend: Optional[str] = None) -> torch.Tensor:
    """Keep flags (bool): ``uniform(word 1 of counter offset + i) >= rho``.

    ``rho`` in [0, 1] is the drop probability, compared in float32 (rho = 0 keeps
    everything). The noise of the same element uses word 0 of the same counter,
    so a masked-noise op draws both from one Philox call. Other arguments as
    :func:`philox_uniform`.
    """
    if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not 0.0 <= float(rho) <= 1.0:
        raise ValueError(f"rho must be a float in [0, 1], got {rho!r}")
    shape, device, be = _prep(shape, seed, offset, device, _OP_MASK, backend)
    seed = _eager.eager_seed(seed)
    if isinstance(seed, torch.Tensor):  # as philox_uniform
        return _ref.philox_keep_mask(shape, seed, offset, float(rho), device=device)
    fn = _philox_keep_mask_op if _eager.via_ops() else _philox_keep_mask_impl
    return fn(shape, seed, offset, float(rho), device, be)
