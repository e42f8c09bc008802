"""Checks of user-supplied numbers: one definition of "an int" and "a number of seconds".

Every option of the package that takes a count or a duration is checked here,
so that each gets the same rules and the same kind of message (naming the
parameter and what it takes).  ``bool`` is never a number here, although
Python's ``bool`` is an ``int``: ``max_size=True`` is a mistake, not ``1``.
"""

from __future__ import annotations

import math
from typing import Literal, overload


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@overload
def integer(name: str, value: object, *, minimum: int, optional: Literal[False] = ...,
            wrong_type: type[Exception] = ...) -> int: ...
@overload
def integer(name: str, value: object, *, minimum: int, optional: bool,
            wrong_type: type[Exception] = ...) -> int | None: ...
def integer(name: str, value: object, *, minimum: int, optional: bool = False,
            wrong_type: type[Exception] = ValueError) -> int | None:
    """``value`` if it is an int of at least ``minimum`` (or None when ``optional``).

    A value of the wrong type raises ``wrong_type``; one out of range ``ValueError``.
    """
    if value is None and optional:
        return None
    what = f"{'None or ' if optional else ''}an int >= {minimum}"
    if not is_int(value):
        raise wrong_type(f"{name} must be {what}, got {value!r}")
    assert isinstance(value, int)
    if value < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


@overload
def duration(name: str, value: object, *, optional: Literal[False], allow_zero: bool = ...,
             finite: bool = ..., hint: str = ...) -> float: ...
@overload
def duration(name: str, value: object, *, optional: bool = ..., allow_zero: bool = ...,
             finite: bool = ..., hint: str = ...) -> float | None: ...
def duration(name: str, value: object, *, optional: bool = True, allow_zero: bool = True,
             finite: bool = False, hint: str = "") -> float | None:
    """``value`` as a float number of seconds, or None when ``optional``.

    Not a number: ``TypeError``; None when required, NaN, negative, zero
    unless ``allow_zero``, infinite when ``finite``: ``ValueError`` (``hint``
    appended to the last).
    """
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must be a number of seconds, got None")
    if not is_number(value):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    assert isinstance(value, (int, float))
    v = float(value)
    if math.isnan(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} "
                         f"number of seconds, got {value!r}")
    if finite and math.isinf(v):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}"
                         + (f" ({hint})" if hint else ""))
    return v
