"""LoRA through PEFT as a training-time method; on a compressed model the adapters sit on the MPO layers."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from mpokit.methods.base import option
from mpokit.methods.checks import check_ints, check_names, positive_int
from mpokit.methods.finetune import Prepared, TrainContext
from mpokit.methods.selection import SelectiveFinetuneConfig

__all__ = ["LoRAConfig", "DEFAULT_TARGETS"]

DEFAULT_TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


@dataclass
class LoRAConfig(SelectiveFinetuneConfig):
    """PEFT LoRA of rank `rank` (alpha = 2 * rank) on `targets`: by default the model type's attention
    projections, or every MPO layer of a compressed model; `select` adapts only a chosen fraction of the
    matrices they match (selection.py). finish merges the adapters (into the MPO cores on a compressed
    model, see mpo_adapter.py)."""

    method: ClassVar[str] = "lora"
    default_lr: ClassVar[float] = 1e-3
    rank: int = option(8, "LoRA rank", flag="--lora-rank", type=positive_int)
    targets: list[str] | str | None = option(
        None, "comma-separated module names for LoRA (default: per model; every MPO layer when compressed)",
        flag="--lora-targets")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ints(self, 1, ["rank"])
        self.targets = check_names("--lora-targets", self.targets)

    def prepare(self, model: nn.Module, ctx: TrainContext) -> Prepared:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ImportError("--method lora needs PEFT: pip install peft") from None
        from transformers.pytorch_utils import Conv1D

        from mpokit.layers.mpo import MPOLinear
        from mpokit.methods.lora.mpo_adapter import lora_config_for_mpo, mpo_lora_targets
        from mpokit.surgery import find_targets

        on_mpo = bool(mpo_lora_targets(model))
        targets = self.targets or (mpo_lora_targets(model) if on_mpo else DEFAULT_TARGETS.get(model.config.model_type))
        if targets is None:
            raise ValueError(f"expected a model type with LoRA defaults {sorted(DEFAULT_TARGETS)} or --lora-targets, "
                             f"got {model.config.model_type!r}")
        candidates = find_targets(model, list(targets), types=(nn.Linear, MPOLinear, Conv1D))
        chosen, record = self.choose(model, candidates, ctx)  # on the model before PEFT wraps it
        cfg = LoraConfig(r=self.rank, lora_alpha=2 * self.rank, lora_dropout=0.0,
                         target_modules=list(targets) if self.select == "all" else chosen,
                         task_type="SEQ_CLS" if ctx.task == "sst2" else "CAUSAL_LM")
        if on_mpo:
            lora_config_for_mpo(cfg)
        with warnings.catch_warnings():  # PEFT warns on any custom layer type; ours is registered on purpose
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            return Prepared(get_peft_model(model, cfg), info={"selected": chosen, "selection": record})

    def finish(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()
