"""Values given by callers, converted once and refused by name when they are the wrong
kind. An integer is a Python int or a NumPy integer: never a bool, a float (1.5 would be
truncated) or text ("12" would be read as digits, or as the ids 1 and 2). The ranges are
checked where the values are used (mostly the Rust core), which names them too."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .errors import ShapeError

Tokens = Sequence[int] | np.ndarray


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def int_value(value: Any, what: str) -> int:
    """`value` as an int, or a TypeError naming `what`."""
    if not is_int(value):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def int_values(values: Iterable[Any], what: str) -> list[int]:
    """A list (or other iterable, not text) of ints, read once; a TypeError naming `what`."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{what} must be a list of ints, not text: {values!r}")
    try:
        items = list(values)
    except TypeError:
        raise TypeError(f"{what} must be a list of ints, got {type(values).__name__}") from None
    for item in items:
        if not is_int(item):
            raise TypeError(f"{what} must hold ints, got {type(item).__name__} {item!r}")
    return [int(item) for item in items]


def token_ids(tokens: Tokens) -> list[int]:
    """A list of ints or a 1-D integer array (read once: an iterator or generator works
    too), non-empty; anything else a ShapeError naming what was wrong."""
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ShapeError(f"tokens must be a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}")
        out = tokens.tolist()  # exact Python ints: a uint64 id past 2**63 stays itself
    elif isinstance(tokens, (str, bytes)):
        raise ShapeError("tokens must be token ids, not text (encode it with a tokenizer first)")
    else:
        try:
            out = int_values(tokens, "tokens")
        except TypeError as e:
            raise ShapeError(str(e)) from None
    if not out:
        raise ShapeError("tokens is empty: give at least one token id")
    return out
