"""Shared CLI helpers: tables for people, JSON for machines, friendly errors."""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from typing import Any, Callable

from mpokit.eval.table import fmt, print_table
from mpokit.io.atomic import write_json

__all__ = ["print_table", "emit_json", "fmt", "fail", "UserError", "positive_int", "nonnegative_int", "int_at_least",
           "positive_float", "nonnegative_float", "fraction", "regex", "module_names"]


class UserError(ValueError):
    """A mistake in what the user asked for (a flag, a path, a file's contents): one line, exit code 2.

    The CLI maps an explicit list of types to user errors (cli.main.USER_ERRORS): this one, the
    library's validation errors (ValueError: "expected X, got Y"), missing files and folders, and
    invalid regular expressions. Anything else is an internal error.
    """


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


def regex(text: str) -> str:
    """A valid Python regular expression (kept as text)."""
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"expected a valid regular expression, got {text!r} ({e})") from None
    return text


def module_names(flag: str, text: str | None) -> list[str] | None:
    """Comma-separated module names; None when the flag was not given, an error when it names nothing."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",")]
    if not any(names):
        raise UserError(f"expected at least one module name in {flag}, got {text!r}")
    if not all(names):
        raise UserError(f"expected module names separated by single commas in {flag}, got an empty name in {text!r}")
    return names


def emit_json(path: str | None, obj: Any) -> None:
    if path:
        write_json(path, obj)
        print(f"wrote {path}", file=sys.stderr)


def fail(message: str, code: int = 2) -> None:
    print(f"mpokit: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
