"""Shared CLI helpers: tables for people, JSON for machines, friendly errors."""
from __future__ import annotations

import json
import sys
from typing import Any

from mpokit.eval.table import fmt, print_table
from mpokit.io.atomic import write_json

__all__ = ["print_table", "emit_json", "fmt", "fail"]


def emit_json(path: str | None, obj: Any) -> None:
    if path:
        write_json(path, obj)
        print(f"wrote {path}", file=sys.stderr)


def fail(message: str, code: int = 2) -> None:
    print(f"mpokit: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
