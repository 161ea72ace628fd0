"""LoRA via PEFT, including adapters on MPO layers merged into their cores."""
from mpokit.methods.lora.config import LoRAConfig

__all__ = ["LoRAConfig"]
