"""Validation shared by method configs: "expected X, got Y" errors for integer, number and choice fields,
and the matching argparse `type=` parsers for config options offered on the command line."""
from __future__ import annotations

import argparse
import math
import numbers
from typing import Any, Callable, Iterable

__all__ = ["check_ints", "check_number", "check_choice", "check_names", "int_at_least", "positive_int",
           "nonnegative_int", "positive_float", "nonnegative_float", "fraction"]


def check_ints(config: Any, low: int, names: Iterable[str], optional: bool = False) -> None:
    """Each named field is an integer >= low (or None when optional)."""
    for name in names:
        value = getattr(config, name)
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"expected an integer {name}{' or None' if optional else ''}, got {value!r}")
        if value < low:
            raise ValueError(f"expected {name} >= {low}, got {value!r}")


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> None:
    """A finite real number within [low, high] ((low, high] when low_open)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"expected a finite number for {name}, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        left = "(" if low_open else "["
        span = f"in {left}{low}, {high}]" if high is not None else f"{'>' if low_open else '>='} {low}"
        raise ValueError(f"expected {name} {span}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"expected {name} in {choices}, got {value!r}")


def check_names(flag: str, value: str | list[str] | None) -> list[str] | None:
    """Module names as a list: a comma-separated string is split; an empty name is an error."""
    if value is None:
        return None
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else list(value)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"expected module names separated by single commas in {flag}, got {value!r}")
    return names


# argparse `type=` functions: a bad value is a usage error (one line, exit 2) before anything loads.

def _number(kind: Callable, text: str, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer >= low."""
    what = f"an integer >= {low}"

    def parse(text: str) -> int:
        value = _number(int, text, what)
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {low}"  # argparse names the type in some messages
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def positive_float(text: str) -> float:
    value = _number(float, text, "a finite number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(float, text, "a finite number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    value = _number(float, text, "a number in [0, 1]")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value
