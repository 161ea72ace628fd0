"""No silent wrong loads: an mpokit checkpoint folder is not a plain transformers folder.

Its weights are MPO cores or packed codes, so plain `AutoModel*.from_pretrained(DIR)` would build
the dense architecture, find none of its weight names, and initialise them at random with only a
warning. The saved config.json therefore names model_type "mpokit" (the real one is kept under
`mpokit_model_type`) and maps the Auto classes to a small loader file in the folder:
- without trust_remote_code, transformers refuses with its "contains custom code" error;
- with trust_remote_code=True, the loader calls `mpokit.load_compressed(DIR)` when mpokit is
  installed, and otherwise raises an error saying what the folder is and how to load or export it.
mpokit reads the config back through `read_model_config`, which restores the real model type.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["GUARD_TYPE", "LOADER_FILE", "write_guarded_config", "read_model_config", "is_guarded"]

GUARD_TYPE = "mpokit"
LOADER_FILE = "mpokit_loader.py"
_REAL_TYPE = "mpokit_model_type"
_AUTO_CLASSES = ("AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoModelForMaskedLM")

LOADER_SOURCE = '''"""Written by mpokit: this folder is an mpokit checkpoint (MPO / quantized layers), not plain weights.

Load it with mpokit (`pip install mpokit`): `mpokit.load_compressed(DIR)`. For a folder that plain
transformers loads without mpokit, export it: `mpokit export DIR --format hf --out NEW_DIR`.
"""
from transformers import PretrainedConfig, PreTrainedModel


class MpokitConfig(PretrainedConfig):
    model_type = "mpokit"


class MpokitModel(PreTrainedModel):
    config_class = MpokitConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        try:
            import mpokit
        except ImportError:
            raise ImportError(
                f"{pretrained_model_name_or_path} is an mpokit checkpoint (compressed layers that plain "
                "transformers cannot rebuild): pip install mpokit and use mpokit.load_compressed(DIR), or "
                "export it with `mpokit export DIR --format hf`") from None
        return mpokit.load_compressed(pretrained_model_name_or_path)
'''


def write_guarded_config(config, folder: Path) -> None:
    """config.json (model_type "mpokit", Auto classes -> the loader) and the loader file, into `folder`."""
    config.save_pretrained(folder)
    path = Path(folder) / "config.json"
    d = json.loads(path.read_text(encoding="utf-8"))
    d[_REAL_TYPE], d["model_type"] = d["model_type"], GUARD_TYPE
    d["auto_map"] = {"AutoConfig": "mpokit_loader.MpokitConfig",
                     **{name: "mpokit_loader.MpokitModel" for name in _AUTO_CLASSES}}
    path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (Path(folder) / LOADER_FILE).write_text(LOADER_SOURCE, encoding="utf-8")


def is_guarded(folder: Path) -> bool:
    """Whether folder/config.json is one that save_compressed wrote (model_type "mpokit")."""
    try:
        return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("model_type") == GUARD_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def read_model_config(folder: Path):
    """The real transformers config of a checkpoint folder (guarded or plain)."""
    import transformers

    path = Path(folder) / "config.json"
    d: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if d.get("model_type") != GUARD_TYPE:
        return transformers.AutoConfig.from_pretrained(folder)
    d.pop("auto_map", None)
    real = d.pop(_REAL_TYPE, None)
    if real not in transformers.CONFIG_MAPPING:
        raise ValueError(f"expected a known {_REAL_TYPE} in {path}, got {real!r}")
    d["model_type"] = real
    return transformers.CONFIG_MAPPING[real].from_dict(d)
