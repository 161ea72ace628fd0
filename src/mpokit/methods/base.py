"""Config base class, the method registry, and the in-place entry points.

`compress_(model, SomeConfig(...))` looks the config's type up in a dict registry
(as torchao maps configs to handlers) and edits the model in place. Each method
package registers its handler with `@register(ConfigType)`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from torch import nn

__all__ = ["MethodConfig", "LayerRecord", "Report", "register", "compress_", "config_from_dict", "REGISTRY",
           "applied_methods"]

CONFIG_VERSION = 1
REGISTRY: dict[type, Callable[..., "Report"]] = {}
CONFIG_TYPES: dict[str, type] = {}


@dataclass
class MethodConfig:
    """Base for method configs: validated dataclasses that round-trip through JSON."""

    method: ClassVar[str] = "base"
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "version": CONFIG_VERSION, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MethodConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {"method", "version"}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})


def config_from_dict(d: dict[str, Any]) -> MethodConfig:
    name = d.get("method")
    if name not in CONFIG_TYPES:
        raise ValueError(f"expected a known method in config, got {name!r} (known: {sorted(CONFIG_TYPES)})")
    return CONFIG_TYPES[name].from_dict(d)


@dataclass
class LayerRecord:
    name: str
    kind: str
    shape: tuple[int, int]
    params_before: int
    params_after: int
    rel_error: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    """What a transform did, layer by layer."""

    method: str
    layers: list[LayerRecord] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def kept_fraction(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "params_before": self.params_before, "params_after": self.params_after,
                "kept_fraction": self.kept_fraction, "layers": [dataclasses.asdict(r) for r in self.layers],
                **self.extra}


def register(config_type: type) -> Callable:
    def wrap(fn: Callable) -> Callable:
        REGISTRY[config_type] = fn
        CONFIG_TYPES[config_type.method] = config_type
        return fn
    return wrap


def applied_methods(model: nn.Module) -> list[dict[str, Any]]:
    """Configs (as dicts) of the transforms applied to this model, oldest first."""
    return getattr(model, "_mpokit_methods", [])


def compress_(model: nn.Module, config: MethodConfig, **kwargs) -> Report:
    """Apply the method described by `config` to `model` in place; returns a Report."""
    handler = REGISTRY.get(type(config))
    if handler is None:
        raise TypeError(f"expected a registered method config, got {type(config).__name__} "
                        f"(registered: {[t.__name__ for t in REGISTRY]})")
    report = handler(model, config, **kwargs)
    model._mpokit_methods = applied_methods(model) + [config.to_dict()]
    return report
