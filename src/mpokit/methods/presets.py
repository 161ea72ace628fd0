"""Named method presets used by the CLI (`--method NAME`) and benchmarks.

A preset is a config class plus fixed field values. `build_config` fills in the
options the user gave; an option that is not a field of the preset's config is an
error naming it (e.g. --bits with --method svd), never silently ignored.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from mpokit.methods.aware.config import AwareConfig
from mpokit.methods.base import MethodConfig
from mpokit.methods.moefication.config import MoEficationConfig
from mpokit.methods.mpo.config import MPOConfig
from mpokit.methods.mpoe.config import MPOEConfig
from mpokit.methods.quant.config import QuantConfig
from mpokit.methods.share.config import ShareConfig

__all__ = ["PRESETS", "build_config", "needs_calibration"]

PRESETS: dict[str, tuple[type, dict[str, Any]]] = {
    # the default: activation- and loss-aware (input Grams + output-gradient Fisher), global allocation;
    # each layer becomes a 2-core MPO (low rank) or stays dense
    "mpo": (AwareConfig, {"layouts": ("lowrank",)}),
    # + a refined 3-core MPO where it beats low rank (SmolLM2 @0.8: same perplexity, 4x the time)
    "mpo-3core": (AwareConfig, {"layouts": ("lowrank", "mpo")}),
    # ablation: input weighting only, global allocation by relative output error
    "aware-global": (AwareConfig, {"sensitivity": "none", "error_norm": "relative"}),
    # baselines
    "whitened-svd": (AwareConfig, {"scaling": "whiten", "sensitivity": "none", "allocation": "uniform",
                                   "correct": False}),  # SVD-LLM
    "asvd": (AwareConfig, {"scaling": "diag", "sensitivity": "none", "allocation": "uniform"}),  # ASVD
    "svd": (AwareConfig, {"scaling": "none", "sensitivity": "none", "allocation": "uniform"}),  # plain truncated SVD
    "mpo-datafree": (MPOConfig, {"num_cores": 3}),  # TT-SVD of the raw weights
    "quant": (QuantConfig, {}),  # group-wise low-bit weights (--bits, --group-size)
    # the same, GPTQ on calibration text (--calibration), columns by input energy, searched group ranges
    "gptq": (QuantConfig, {"algorithm": "gptq", "act_order": True, "clip_search": True}),
    # experts and sharing
    "moefication": (MoEficationConfig, {}),  # FFN -> experts + trained router, top-k computed (--experts, --top-k)
    # + 6 always-on experts and a least-squares refit of the down projections (best measured at 25%)
    "moefication-refit": (MoEficationConfig, {"shared_experts": 6, "refit": True}),
    "mpoe": (MPOEConfig, {}),  # FFN upcycled to MPO experts sharing central cores (--experts, --top-k)
    "share": (ShareConfig, {}),  # MPO central cores shared across layers (--groups, --budget or --max-bond)
}


def build_config(name: str, **options: Any) -> MethodConfig:
    """Config for preset `name`; options left None are not set."""
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(PRESETS)}")
    cls, fixed = PRESETS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in options.items() if v is not None}
    foreign = sorted(k for k in given if k not in fields)
    if foreign:
        raise ValueError(f"option(s) {', '.join('--' + k.replace('_', '-') for k in foreign)} do not apply "
                         f"to --method {name}")
    return cls(**{**fixed, **given})


def needs_calibration(config: MethodConfig) -> bool:
    """Whether compress_ needs calibration data (tokenizer + text) for this config."""
    return bool(getattr(config, "needs_calibration", False))
