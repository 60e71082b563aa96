"""Argument checks of the library's functions (configs are checked by `facekd.config`): one place
for "an integer, not a bool, in range" and "a finite number in range", with one message style."""

from __future__ import annotations

import math
import numbers

from facekd.errors import ConfigError


def whole_number(value: object, name: str, minimum: int = 1, maximum: int | None = None, note: str = "") -> int:
    """`value` as an int if it is an integer (Python or numpy, not a bool) in [minimum, maximum];
    else ConfigError "<name> must be <what><note>, got <value>"."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum \
            or (maximum is not None and value > maximum):
        what = (f"an integer from {minimum} to {maximum}" if maximum is not None
                else "a positive integer" if minimum == 1 else f"an integer >= {minimum}")
        raise ConfigError(f"{name} must be {what}{note}, got {value!r}")
    return int(value)


def real_number(value: object, name: str, minimum: float | None = None, maximum: float | None = None,
                positive: bool = False) -> float:
    """`value` as a float if it is a finite real number (not a bool) in [minimum, maximum] (> 0
    with `positive`); else ConfigError "<name> must be <what>, got <value>"."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if not ok or (positive and value <= 0) or (minimum is not None and value < minimum) \
            or (maximum is not None and value > maximum):
        what = ("a positive number" if positive else f"a number from {minimum:g} to {maximum:g}"
                if minimum is not None and maximum is not None else f"a finite number >= {minimum:g}"
                if minimum is not None else "a finite number")
        raise ConfigError(f"{name} must be {what}, got {value!r}")
    return float(value)
