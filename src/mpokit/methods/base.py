"""Config base class, the method registry, and the in-place entry points.

Every method is a config class with one name: the CLI's `--method NAME`, `config.method` and
the registry key are the same string. A config class registers its name when it is defined
(a subclass with its own `method` and other defaults is a named preset, e.g. GPTQConfig of
QuantConfig), so `METHODS[name]` is the config class. Handlers are looked up by type along the
config's MRO (as torchao maps configs to handlers): `@register(ConfigType)` on the function that
edits the model in place. `kind` says where a method applies: "compress" (`compress_`),
"finetune" (prepare before training, finish after) or "kv-cache" (a cache for generation).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from torch import nn

from mpokit.surgery.offload import offload_of

__all__ = ["MethodConfig", "LayerRecord", "Report", "register", "compress_", "config_from_dict", "REGISTRY",
           "METHODS", "method_names", "get_method", "applied_methods", "option", "cli_options"]

CONFIG_VERSION = 2
KINDS = ("compress", "finetune", "kv-cache")
REGISTRY: dict[type, Callable[..., "Report"]] = {}  # config type -> handler that edits the model in place
METHODS: dict[str, type] = {}  # method name -> config class
# Version-1 records named the aware method "mpo-aware" and the data-free one "mpo".
_V1_NAMES = {"mpo-aware": "mpo", "mpo": "mpo-datafree"}


@dataclass
class MethodConfig:
    """Base for method configs: validated dataclasses that round-trip through JSON."""

    method: ClassVar[str] = "base"
    kind: ClassVar[str] = "compress"
    # True where the handler reads weights only block by block (calibration.stream_blocks, surgery.offload
    # .resident), so it runs on a block-streamed model (io/lazy.py) holding one block in memory
    streamable: ClassVar[bool] = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        name = cls.__dict__.get("method")
        if name is None:  # an abstract base (e.g. the fine-tuning base) or a helper subclass
            return
        if cls.kind not in KINDS:
            raise TypeError(f"expected {cls.__name__}.kind in {KINDS}, got {cls.kind!r}")
        if METHODS.get(name, cls).__qualname__ != cls.__qualname__:
            raise TypeError(f"method name {name!r} of {cls.__name__} is taken by {METHODS[name].__name__}")
        METHODS[name] = cls

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


def option(default: Any = None, help: str = "", *, flag: str | None = None, type: Callable | None = None,
           choices: tuple | None = None) -> Any:
    """A config field that the CLI offers as `--field-name` (or `flag`); the flag is unset unless given,
    so the config's own default (which may differ between presets) applies. Values are checked by
    the config's __post_init__. A bool field becomes a switch that sets True."""
    meta = {"help": help, "flag": flag, "type": type, "choices": choices}
    return field(default=default, metadata={"cli": meta})


def cli_options(kind: str) -> dict[str, dict[str, Any]]:
    """Field name -> CLI settings (help, flag, type, choices, defaults per method) over the methods of `kind`.
    A field declared with `option` in any method of that kind is offered once; the method chosen
    on the command line must have the field, else build_config names the flag as not applying."""
    out: dict[str, dict[str, Any]] = {}
    for name in method_names(kind):
        for f in dataclasses.fields(METHODS[name]):
            meta = f.metadata.get("cli")
            if meta is not None and f.name not in out:
                out[f.name] = {**meta, "defaults": {}}
    for name in method_names(kind):
        for f in dataclasses.fields(METHODS[name]):
            if f.name in out:
                out[f.name]["defaults"][name] = f.default
    return out


def method_names(kind: str | None = None) -> list[str]:
    """Registered method names, of one kind or all."""
    return sorted(n for n, c in METHODS.items() if kind is None or c.kind == kind)


def get_method(name: str, kind: str | None = None) -> type:
    """The config class registered as `name` (of `kind`, when given)."""
    cls = METHODS.get(name)
    if cls is None or (kind is not None and cls.kind != kind):
        raise ValueError(f"unknown method {name!r}; expected one of {method_names(kind)}")
    return cls


def config_from_dict(d: dict[str, Any]) -> MethodConfig:
    name = d.get("method")
    if d.get("version", CONFIG_VERSION) < 2:
        name = _V1_NAMES.get(name, name)
    return get_method(name).from_dict(d)


def handler_for(config: MethodConfig) -> Callable[..., "Report"] | None:
    """The registered handler of the config's type or its nearest registered base."""
    return next((REGISTRY[t] for t in type(config).__mro__ if t in REGISTRY), None)


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
    """Decorator: `fn(model, config, **kw) -> Report` applies configs of `config_type` (and its presets)."""
    def wrap(fn: Callable) -> Callable:
        REGISTRY[config_type] = fn
        return fn
    return wrap


def applied_methods(model: nn.Module) -> list[dict[str, Any]]:
    """Configs (as dicts) of the transforms applied to this model, oldest first."""
    return getattr(model, "_mpokit_methods", [])


def compress_(model: nn.Module, config: MethodConfig, **kwargs) -> Report:
    """Apply the method described by `config` to `model` in place; returns a Report."""
    if isinstance(config, MethodConfig) and config.kind != "compress":
        where = {"finetune": "mpokit finetune / mpokit.train.finetune", "kv-cache": "mpokit eval --kv-cache / "
                 "mpokit.methods.kv_cache.make_kv_cache"}[config.kind]
        raise TypeError(f"expected a compression config, got {type(config).__name__} (applied by {where})")
    handler = handler_for(config)
    if handler is None:
        raise TypeError(f"expected a registered method config, got {type(config).__name__} "
                        f"(registered: {[t.__name__ for t in REGISTRY]})")
    if offload_of(model) is not None and not config.streamable:
        raise ValueError(f"method {config.method!r} reads the whole model at once and cannot run on a block-streamed "
                         "model; load it whole (mpokit compress --no-stream)")
    report = handler(model, config, **kwargs)
    model._mpokit_methods = applied_methods(model) + [config.to_dict()]
    return report
