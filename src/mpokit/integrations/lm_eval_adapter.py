"""Run lm-evaluation-harness on mpokit models (when `lm_eval` is installed; it is optional).

mpokit models stay transformers models whose layers were swapped, so the harness's HFLM
wrapper runs them once it is handed the loaded model instead of a hub name:

    from mpokit.integrations.lm_eval_adapter import run_lm_eval
    run_lm_eval("out/smollm2-int4", tasks=["arc_easy"], limit=100)

`register_mpokit_model()` also makes `lm_eval --model mpokit --model_args path=out/smollm2-int4`
work from the harness's own command line (call it from a small launcher script).

Tasks are registered names (arc_easy, a group or a tag) or paths to task YAML files:
`task_manager_for(specs)` indexes the harness's own tasks only when a name asks for them (some
seconds), and a YAML's folder (its includes and sibling tasks) otherwise, so a local task over local
data (dataset_path: json / csv with data_files) runs with no network at all.
"""
from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path
from typing import Any

__all__ = ["is_lm_eval_available", "mpokit_lm", "run_lm_eval", "register_mpokit_model", "task_manager_for",
           "summarize_results", "metric_rows"]

_YAML_SUFFIXES = (".yaml", ".yml")


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


def _is_yaml_path(spec: str) -> bool:
    return spec.lower().endswith(_YAML_SUFFIXES) or Path(spec).is_file()


def _yaml_task_name(path: Path) -> str:
    """The task (or group) a task YAML file defines; its `!function` tags are left unresolved."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"expected an lm-eval task YAML file, got {path}, which does not parse "
                         f"({' '.join(str(e).split())})") from None
    name = cfg.get("task") or cfg.get("group") if isinstance(cfg, dict) else None
    if not isinstance(name, str):
        raise ValueError(f"expected an lm-eval task YAML file with a `task:` (or `group:`) name, got {path}")
    return name


def task_manager_for(specs: list[str] | str) -> tuple[Any, list[str]]:
    """(TaskManager, task names) for registered names and/or paths to task YAML files.

    A YAML path adds its folder to the include path and is replaced by the name it defines; the
    harness's own tasks are indexed only when some spec is not a path. Unknown names and missing
    files are ValueError / FileNotFoundError naming what was given (before any model is loaded).
    """
    _require()
    from lm_eval.tasks import TaskManager

    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise ValueError("expected at least one lm-eval task, got none")
    names, folders = [], []
    for spec in specs:
        if not _is_yaml_path(spec):
            names.append(spec)
            continue
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no such lm-eval task file: {spec}")
        names.append(_yaml_task_name(path))
        folders.append(str(path.resolve().parent))
    wants_defaults = len(folders) < len(specs)
    manager = TaskManager(include_path=list(dict.fromkeys(folders)) or None, include_defaults=wants_defaults)
    known = set(manager.all_tasks)
    for spec, name in zip(specs, names):
        if name in known:
            continue
        if _is_yaml_path(spec):  # the harness's index skips a file it cannot read
            raise ValueError(f"expected an lm-eval task YAML file, got {spec}, which lm-eval does not read as task "
                             f"{name!r} (check its keys and includes)")
        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"expected a registered lm-eval task, group or tag, or a path to a task YAML file, got "
                         f"{name!r}{hint}")
    return manager, names


def run_lm_eval(model: Any = None, tasks: list[str] | str = ("arc_easy",), tokenizer: Any = None,
                num_fewshot: int | None = None, limit: int | float | None = None, batch_size: int = 1,
                **simple_evaluate_kwargs: Any) -> dict:
    """lm_eval.simple_evaluate on an mpokit model; returns the harness's result dict.

    tasks: registered names or task YAML paths (see task_manager_for), unless a task_manager is given.
    """
    _require()
    import lm_eval

    if simple_evaluate_kwargs.get("task_manager") is None:
        simple_evaluate_kwargs["task_manager"], tasks = task_manager_for(tasks)
    lm = model if hasattr(model, "loglikelihood") else mpokit_lm(model, tokenizer, batch_size=batch_size)
    return lm_eval.simple_evaluate(model=lm, tasks=[tasks] if isinstance(tasks, str) else list(tasks),
                                   num_fewshot=num_fewshot, limit=limit, **simple_evaluate_kwargs)


def summarize_results(results: dict) -> dict[str, Any]:
    """The JSON-safe part of a simple_evaluate result: metrics per task (and group), samples per task,
    task versions and few-shot counts; the per-sample log and the environment dump are left out."""
    keep = ("results", "groups", "n-samples", "versions", "n-shot", "higher_is_better", "lm_eval_version")
    out = {k: results[k] for k in keep if k in results}
    out["limit"] = (results.get("config") or {}).get("limit")
    return out


def metric_rows(summary: dict) -> list[dict[str, Any]]:
    """One row per (task, metric, filter) for a printed table: value and standard error."""
    rows = []
    for task, metrics in summary.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric, "filter": filt, "value": value,
                         "stderr": stderr if isinstance(stderr, (int, float)) else None,
                         "n": (summary.get("n-samples", {}).get(task) or {}).get("effective")})
    return rows


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
