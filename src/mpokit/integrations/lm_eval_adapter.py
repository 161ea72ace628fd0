"""Run lm-evaluation-harness on mpokit models (when `lm_eval` is installed; it is optional).

mpokit models stay transformers models whose layers were swapped, so the harness's HFLM
wrapper runs them once it is handed the loaded model instead of a hub name:

    from mpokit.integrations.lm_eval_adapter import run_lm_eval
    run_lm_eval("out/smollm2-int4", tasks=["arc_easy"], limit=100)

`register_mpokit_model()` also makes `lm_eval --model mpokit --model_args path=out/smollm2-int4`
work from the harness's own command line (call it from a small launcher script).
"""
from __future__ import annotations

import importlib.util
from typing import Any

__all__ = ["is_lm_eval_available", "mpokit_lm", "run_lm_eval", "register_mpokit_model"]


def is_lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def _require() -> None:
    if not is_lm_eval_available():
        raise ImportError("lm-evaluation-harness is not installed: pip install lm-eval")


def mpokit_lm(model: Any = None, tokenizer: Any = None, batch_size: int = 1, max_length: int | None = None,
              **hflm_kwargs: Any):
    """An lm_eval HFLM around an mpokit model: a loaded model (with its tokenizer), or anything
    `mpokit.load_model` accepts (checkpoint folder, alias, .gguf, hub id; None = default model)."""
    _require()
    from lm_eval.models.huggingface import HFLM

    if model is None or isinstance(model, str):
        from mpokit.io.models import load_model

        loaded = load_model(model)
        model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
    if tokenizer is None:
        raise ValueError("expected a tokenizer with a loaded model, got None")
    return HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                **hflm_kwargs)


def run_lm_eval(model: Any = None, tasks: list[str] | str = ("arc_easy",), tokenizer: Any = None,
                num_fewshot: int | None = None, limit: int | float | None = None, batch_size: int = 1,
                **simple_evaluate_kwargs: Any) -> dict:
    """lm_eval.simple_evaluate on an mpokit model; returns the harness's result dict."""
    _require()
    import lm_eval

    lm = model if hasattr(model, "loglikelihood") else mpokit_lm(model, tokenizer, batch_size=batch_size)
    return lm_eval.simple_evaluate(model=lm, tasks=[tasks] if isinstance(tasks, str) else list(tasks),
                                   num_fewshot=num_fewshot, limit=limit, **simple_evaluate_kwargs)


def register_mpokit_model(name: str = "mpokit") -> type:
    """Register an lm_eval model class `name` taking model_args `path=...` (an mpokit checkpoint or alias)."""
    _require()
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    class MpokitLM(HFLM):
        def __init__(self, path: str | None = None, batch_size: int | str = 1, max_length: int | None = None,
                     **kwargs: Any):
            from mpokit.io.models import load_model

            loaded = load_model(path)
            kwargs.pop("pretrained", None)
            super().__init__(pretrained=loaded.model.eval(), tokenizer=loaded.tokenizer, batch_size=batch_size,
                             max_length=max_length, **kwargs)

    return register_model(name)(MpokitLM)
