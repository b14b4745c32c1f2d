# SPDX-License-Identifier: Apache-2.0
"""The errors a dataset raises when its files are missing or unreadable, and
:func:`guard_read`, which turns any failure to decode a user's file into one of
them."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where the configuration says."""


class DatasetFormatError(ValueError):
    """A dataset's files are there but not in the expected format."""


def _reason(e: BaseException) -> str:
    """``Type: first line of the message``, short: torch's and DataLoader's
    messages run to dozens of lines."""
    first = (str(e).strip().splitlines() or [""])[0].rstrip(".")
    return f"{type(e).__name__}: {first[:160]}" if first else type(e).__name__


@contextlib.contextmanager
def guard_read(path: str | os.PathLike, what: str, fix: str,
               error: type[Exception] = DatasetFormatError) -> Iterator[None]:
    """Read and decode a user's file inside ``with guard_read(...)``: any failure
    (truncated, corrupt, of another kind, unreadable) becomes one ``error``
    naming ``path``, saying it is not a readable ``what``, then ``fix`` (what to
    do). An ``error`` raised inside keeps its message and gains ``fix``. The
    cause stays chained (``cifd --traceback`` shows it).

    The net is wide on purpose: decoders raise EOFError, OSError, zlib.error,
    pickle.UnpicklingError, RuntimeError, KeyError, ... on bad bytes, and
    inside the block every one of them means the file cannot be used."""
    try:
        yield
    except error as e:
        raise error(f"{e}. {fix}") from e
    except Exception as e:  # noqa: BLE001 - see the docstring
        why = "an empty file" if os.path.isfile(path) and os.path.getsize(path) == 0 \
            else _reason(e)
        raise error(f"{path} is not a readable {what} ({why}). {fix}") from e
