"""Named method presets used by the CLI (`--method NAME`) and benchmarks."""
from __future__ import annotations

from typing import Any, Callable

from mpokit.methods.base import MethodConfig
from mpokit.methods.mpo.config import MPOConfig

__all__ = ["PRESETS", "build_config"]


def _mpo(num_cores: int = 3, lowrank: bool = False) -> Callable[..., MethodConfig]:
    def make(num_cores_override=None, **kw) -> MethodConfig:
        return MPOConfig(num_cores=num_cores_override or num_cores, lowrank=lowrank, **kw)
    return make


PRESETS: dict[str, Callable[..., MethodConfig]] = {
    "mpo": _mpo(3),  # becomes the activation-aware path once calibration lands
    "mpo-datafree": _mpo(3),
    "svd": _mpo(2, lowrank=True),
}


def build_config(name: str, num_cores: int | None = None, **kw: Any) -> MethodConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(PRESETS)}")
    kw = {k: v for k, v in kw.items() if v is not None}
    return PRESETS[name](num_cores_override=num_cores, **kw)
