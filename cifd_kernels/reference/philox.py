# SPDX-License-Identifier: Apache-2.0
"""Philox4x32-10 in vectorised torch int64 arithmetic: the randomness oracle.

Bit-identical to ``triton.language.randint4x`` / ``rand`` (docs/METHOD.md
section 5) for the same 64-bit ``seed`` and ``offset``:

* key     = (seed & 0xffffffff, seed >> 32)
* counter = (o & 0xffffffff, o >> 32, 0, 0) with o = offset + linear index
* uniform = int32(word) with negatives mapped by bitwise NOT, as float32,
  times 4.6566127342e-10 in float32 (so uniform lies in [0, 1)).

Word 0 feeds noise, word 1 feeds keep masks. Every uint32 lives in an int64
tensor; products of two 32-bit values are split into 16-bit halves so nothing
overflows int64.
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10  # largest float32 scale with (2**31-1)*scale < 1
MASK32 = 0xFFFFFFFF
MAX_SEED = 2**63 - 1


def _mul_hi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a*b, a uint32 in int64, b a constant."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_lo = a * b_lo  # < 2**48
    p_hi = a * b_hi  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & MASK32
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 rounds on int64 tensors holding uint32 values; key as Python ints or
    0-dim int64 tensors (a tensor seed's halves)."""
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def check_seed_offset(seed, offset: int, numel: int = 0) -> None:
    """Seeds and offsets are non-negative 63-bit Python ints (they travel as torch ``int``).

    A seed may also be a 0-dim int64 CPU tensor: what :func:`draw_seed` gives while
    ``torch.compile`` traces, so that a compiled training step draws its noise seed
    in the graph, without a graph break. Its metadata is always checked here, its
    value too when nothing traces (a CPU read, no device sync); while tracing, the
    value is checked where the kernels' op reads it, at run time (:func:`seed_value`)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.dim() != 0 or seed.device.type != "cpu":
            raise TypeError(f"seed as a tensor must be a 0-dim int64 CPU tensor, got {seed.dtype} of "
                            f"shape {tuple(seed.shape)} on {seed.device}")
        readable = (type(seed) is torch.Tensor and not torch.compiler.is_compiling()
                    and _get_current_dispatch_mode() is None)
        checked = (("seed", int(seed)), ("offset", offset)) if readable else (("offset", offset),)
    else:
        checked = (("seed", seed), ("offset", offset))
    for name, v in checked:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be a Python int, got {type(v).__name__}")
        if not 0 <= v <= MAX_SEED:
            raise ValueError(f"{name} must be in [0, 2**63), got {v}")
    if offset + numel - 1 > MAX_SEED:
        raise ValueError(f"offset + numel must stay below 2**63 (offset={offset}, numel={numel})")


def seed_value(seed) -> int:
    """``seed`` as a Python int, checked (a tensor seed is read on the host: a CPU tensor,
    so no device sync). Kernel launchers call this; the reference computes with a tensor
    seed as is (traceable)."""
    check_seed_offset(seed, 0)  # a tensor's metadata and, read here on the host, its value
    return int(seed) if isinstance(seed, torch.Tensor) else seed


def philox_words(numel: int, seed, offset: int, device=None) -> tuple[torch.Tensor, ...]:
    """The four Philox output words (uint32 in int64) for counters offset .. offset+numel-1."""
    check_seed_offset(seed, offset, numel)
    o = torch.arange(numel, dtype=torch.int64, device=device) + offset
    c0 = o & MASK32
    c1 = o >> 32
    zero = torch.zeros_like(c0)
    return philox4x32(c0, c1, zero, zero, seed & MASK32, (seed >> 32) & MASK32)


def uint_to_uniform(word: torch.Tensor) -> torch.Tensor:
    """uint32 word (in int64) -> float32 uniform in [0, 1), exactly as ``tl.rand``."""
    i = torch.where(word >= 2**31, word - 2**32, word)  # bit-cast to int32
    i = torch.where(i < 0, -i - 1, i)  # bitwise NOT of a negative int32
    # int -> float32 rounds to nearest even, then one float32 multiply (no FMA).
    return i.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=i.device)


def _shape(shape) -> tuple[int, ...]:
    """``shape``, an int or a sequence of ints (numpy's too; no bools, no floats), as a tuple
    of ints >= 0; TypeError or ValueError naming ``shape`` else."""
    seq = shape if isinstance(shape, (list, tuple, torch.Size)) else (shape,)
    if any(isinstance(s, bool) or not hasattr(s, "__index__") for s in seq):
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}")
    shape = tuple(operator.index(s) for s in seq)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must be non-negative, got {shape}")
    return shape


def philox_uniform(shape: Sequence[int] | int, seed: int, offset: int = 0, device=None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """Uniforms in [0, 1) of the given shape: word 0 of counter ``offset + i``, i row-major.

    Computed in float32; cast to ``dtype`` (default float32) afterwards.
    """
    shape = _shape(shape)
    n = 1
    for s in shape:
        n *= s
    w0, _, _, _ = philox_words(n, seed, offset, device)
    u = uint_to_uniform(w0).reshape(shape)
    return u if dtype in (None, torch.float32) else u.to(dtype)


def philox_keep_mask(shape: Sequence[int] | int, seed: int, offset: int, rho: float,
                     device=None) -> torch.Tensor:
    """Keep mask (bool): ``uniform(word 1 of counter offset + i) >= rho``.

    ``rho`` is the drop probability, compared in float32. rho = 0 keeps all.
    """
    shape = _shape(shape)
    n = 1
    for s in shape:
        n *= s
    _, w1, _, _ = philox_words(n, seed, offset, device)
    rho32 = torch.tensor(float(rho), dtype=torch.float32, device=w1.device)
    return (uint_to_uniform(w1) >= rho32).reshape(shape)


def philox_noise(shape, seed: int, offset: int = 0, device=None) -> torch.Tensor:
    """Uniform noise u = uniform - 1/2 in float32 (word 0), as every CIFD kernel draws it."""
    return philox_uniform(shape, seed, offset, device) - 0.5


def draw_seed(generator: torch.Generator | None = None):
    """A fresh seed in [0, 2**62) from torch's CPU generator (so ``torch.manual_seed``
    makes runs repeatable). Modules call this when no seed is passed.

    Eagerly a Python int (one read of a CPU tensor, never of a device). While
    ``torch.compile`` traces, the 0-dim int64 CPU tensor itself: the draw is part of
    the graph (no ``.item()``, so no graph break and no data-dependent guard), and
    the ops read it where their kernels launch, on the host (no device sync). Both
    take the same value from the generator: a compiled step that draws its seed
    gives eager's noise (under ``aot_eager``; Inductor lowers ``randint`` with its own
    generator)."""
    t = torch.randint(0, 2**62, (), generator=generator, dtype=torch.int64)
    return t if torch.compiler.is_compiling() else int(t.item())
