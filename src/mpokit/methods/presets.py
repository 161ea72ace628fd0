"""`--method NAME` -> config: a registered method, filled with the user's options.

Each name is a config class of its own (presets are subclasses with other defaults, defined
next to their method), so `build_config(name).method == name`. An option that is not a field
of the config is an error naming it (e.g. --bits with --method svd), never silently ignored.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import mpokit.methods  # noqa: F401  (registers every method package)
from mpokit.methods.base import METHODS, MethodConfig, cli_options, get_method, method_names

__all__ = ["PRESETS", "build_config", "needs_calibration"]


# name -> config class of every registered compression method (all are registered by now)
PRESETS: dict[str, type] = {n: METHODS[n] for n in method_names("compress")}


def build_config(name: str, kind: str = "compress", **options: Any) -> MethodConfig:
    """Config for method `name` of `kind`; options left None are not set."""
    cls = get_method(name, kind)
    fields = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in options.items() if v is not None}
    foreign = sorted(k for k in given if k not in fields)
    if foreign:
        flags = {k: m["flag"] for k, m in cli_options(kind).items() if m["flag"]}
        names = ", ".join(flags.get(k) or "--" + k.replace("_", "-") for k in foreign)
        raise ValueError(f"option(s) {names} do not apply to --method {name}")
    return cls(**given)


def needs_calibration(config: MethodConfig) -> bool:
    """Whether compress_ needs calibration data (tokenizer + text) for this config."""
    return bool(getattr(config, "needs_calibration", False))
