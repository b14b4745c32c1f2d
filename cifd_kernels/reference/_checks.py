# SPDX-License-Identifier: Apache-2.0
"""Validators for hyperparameters (Python numbers, not tensors), one message style
for every layer that takes them: the modules' constructors, the reference
functions and, through those, the ops::

    TypeError:  R must be a number, got str (RDMBank, element 1)
    ValueError: R must be finite and >= 0, got -1.0 (RDMBank, element 1)

``name`` is the argument's name as the caller spelled it; ``where`` (optional)
the class or function it entered, ``index`` the position in a sequence argument.
A bool is not a number here (``True`` as a weight is a mistake, not 1.0); ints
and numpy scalars are. Each validator returns the value converted (``float`` /
``int``), so callers store what was checked.

They read Python values only: a tensor-valued argument (``R`` or ``lam`` as a
tensor) is shape-checked by its caller, never value-checked, since that would
need a host sync.

The tensor checks at the end (``check_tensor``, ``check_same_device``,
``check_dim``, ``check_nonempty``) read metadata only (type, dtype, shape,
device): every layer (reference, ops, modules) checks its tensors with them, so
a bad argument gets the same message on every backend.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

import torch

__all__ = [
    "check_real", "check_finite", "check_finite_nonneg", "check_positive", "check_prob",
    "check_int", "check_length", "check_sequence", "check_choice", "check_rho_s",
    "check_tensor", "check_same_device", "check_dim", "check_nonempty",
]


def _at(where: Optional[str], index: Optional[int] = None) -> str:
    parts = [p for p in (where, None if index is None else f"element {index}") if p]
    return f" ({', '.join(parts)})" if parts else ""


def _type_name(v: Any) -> str:
    return type(v).__name__


def check_real(name: str, v: Any, where: Optional[str] = None, index: Optional[int] = None) -> float:
    """``v`` as a float; TypeError unless it is a real number (bool excluded)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_type_name(v)}{_at(where, index)}")
    return float(v)


def check_finite(name: str, v: Any, where: Optional[str] = None, index: Optional[int] = None) -> float:
    """A finite real number (no NaN, no inf)."""
    f = check_real(name, v, where, index)
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, got {v!r}{_at(where, index)}")
    return f


def check_finite_nonneg(name: str, v: Any, where: Optional[str] = None,
                        index: Optional[int] = None) -> float:
    """A finite real number >= 0 (loss weights: 0 switches a term off)."""
    f = check_real(name, v, where, index)
    if not (math.isfinite(f) and f >= 0.0):
        raise ValueError(f"{name} must be finite and >= 0, got {v!r}{_at(where, index)}")
    return f


def check_positive(name: str, v: Any, where: Optional[str] = None, index: Optional[int] = None) -> float:
    """A finite real number > 0 (temperatures, scales)."""
    f = check_real(name, v, where, index)
    if not (math.isfinite(f) and f > 0.0):
        raise ValueError(f"{name} must be finite and > 0, got {v!r}{_at(where, index)}")
    return f


def check_prob(name: str, v: Any, where: Optional[str] = None, *, lo_closed: bool = True,
               hi_closed: bool = False, index: Optional[int] = None) -> float:
    """A probability in the interval from 0 to 1, each end closed or open as asked
    (default ``[0, 1)``: a dropout rate of 1 would switch its target off for good)."""
    f = check_real(name, v, where, index)
    lo_ok = f >= 0.0 if lo_closed else f > 0.0
    hi_ok = f <= 1.0 if hi_closed else f < 1.0
    if not (lo_ok and hi_ok):  # NaN fails both
        interval = f"{'[' if lo_closed else '('}0, 1{']' if hi_closed else ')'}"
        raise ValueError(f"{name} must be in {interval}, got {v!r}{_at(where, index)}")
    return f


def check_int(name: str, v: Any, where: Optional[str] = None, lo: Optional[int] = 1,
              index: Optional[int] = None) -> int:
    """An int (bool excluded; a float such as 3.0 is a TypeError) >= ``lo``
    (None: any int). ``lo = 1`` reads "a positive int"."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_type_name(v)}{_at(where, index)}")
    i = int(v)
    if lo is not None and i < lo:
        what = "a positive int" if lo == 1 else f"an int >= {lo}"
        raise ValueError(f"{name} must be {what}, got {v!r}{_at(where, index)}")
    return i


def check_length(name: str, seq: Sequence, expected: int, what: str, where: Optional[str] = None) -> None:
    """``len(seq) == expected``; ``what`` names ``expected`` (e.g. ``"n"``):
    ``len(R) = 2 but n = 3``."""
    if len(seq) != expected:
        raise ValueError(f"len({name}) = {len(seq)} but {what} = {expected}{_at(where)}")


def check_sequence(name: str, seq: Any, check, where: Optional[str] = None,
                   length: Optional[int] = None, what: str = "expected") -> tuple:
    """A non-string sequence (list, tuple, ...) whose elements each pass ``check``
    (one of the validators above), as a tuple of the checked values; non-empty,
    and of ``length`` elements if given (``what`` names that length)."""
    if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
        raise TypeError(f"{name} must be a sequence of numbers, got {_type_name(seq)}{_at(where)}")
    if length is not None:
        check_length(name, seq, length, what, where)
    elif len(seq) == 0:
        raise ValueError(f"{name} must hold at least one value, got an empty {_type_name(seq)}{_at(where)}")
    return tuple(check(name, v, where, index=i) for i, v in enumerate(seq))


def check_choice(name: str, v: Any, choices: Sequence[str], where: Optional[str] = None) -> str:
    """One of the strings ``choices``."""
    if not isinstance(v, str):
        raise TypeError(f"{name} must be one of {tuple(choices)}, got {_type_name(v)}{_at(where)}")
    if v not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {v!r}{_at(where)}")
    return v


def check_rho_s(rho, s) -> None:
    for name, v in (("rho", rho), ("s", s)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a Python float, got {type(v).__name__}")
    if not 0.0 <= float(rho) <= 1.0:
        raise ValueError(f"rho (drop probability) must be in [0, 1], got {rho}")
    if not 0.0 < float(s) < float("inf"):
        raise ValueError(f"s (noise scale) must be finite and > 0, got {s}")


# ----------------------------------------------------------------------------- tensors
def check_tensor(name: str, t, ndim: Optional[int] = None, floating: bool = True,
                 integer: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if integer:
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor (class indices), got {t.dtype}")
    elif floating and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


def check_same_device(ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_dim(name: str, size: int, expected: int, what: str) -> None:
    if size != expected:
        raise ValueError(f"{name}: {what} is {size}, expected {expected}")


def check_nonempty(name: str, batch: int) -> None:
    if batch == 0:
        raise ValueError(f"{name} is an empty batch (B = 0): the batch-mean loss is undefined")
