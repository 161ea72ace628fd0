"""Shared CLI helpers: tables for people, JSON for machines, friendly errors."""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from mpokit.eval.table import fmt, print_table
from mpokit.io.atomic import write_json
from mpokit.methods.checks import (fraction, int_at_least, nonnegative_float, nonnegative_int, positive_float,
                                   positive_int)

__all__ = ["print_table", "emit_json", "fmt", "fail", "UserError", "positive_int", "nonnegative_int", "int_at_least",
           "positive_float", "nonnegative_float", "fraction", "regex", "module_names", "add_method_flags",
           "method_flag_values", "DTYPES", "add_device_flag", "resolve_device"]


class UserError(ValueError):
    """A mistake in what the user asked for (a flag, a path, a file's contents): one line, exit code 2.

    The CLI maps an explicit list of types to user errors (cli.main.USER_ERRORS): this one, the
    library's validation errors (ValueError: "expected X, got Y"), missing files and folders, and
    invalid regular expressions. Anything else is an internal error.
    """


def regex(text: str) -> str:
    """A valid Python regular expression (kept as text)."""
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"expected a valid regular expression, got {text!r} ({e})") from None
    return text


def module_names(flag: str, text: str | None) -> list[str] | None:
    """Comma-separated module names; None when the flag was not given, an error when it names nothing."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",")]
    if not any(names):
        raise UserError(f"expected at least one module name in {flag}, got {text!r}")
    if not all(names):
        raise UserError(f"expected module names separated by single commas in {flag}, got an empty name in {text!r}")
    return names


def emit_json(path: str | None, obj: Any) -> None:
    if path:
        write_json(path, obj)
        print(f"wrote {path}", file=sys.stderr)


def fail(message: str, code: int = 2) -> None:
    print(f"mpokit: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)


def _default_text(defaults: dict[str, Any]) -> str:
    values = {repr(v) if isinstance(v, str) else str(v) for v in defaults.values()}
    if len(values) == 1:
        return f"default {values.pop()}"
    if len(defaults) <= 3:
        return "default " + ", ".join(f"{k} {v}" for k, v in defaults.items())
    return "default per method"


def flag_name(field_name: str, meta: dict[str, Any]) -> str:
    return meta["flag"] or "--" + field_name.replace("_", "-")


def add_method_flags(parser, kind: str) -> list[str]:
    """One flag per config field declared with methods.base.option() in the methods of `kind`; returns the dests."""
    import mpokit.methods  # noqa: F401  (registers every method)
    from mpokit.methods.base import cli_options

    dests = []
    for name, meta in cli_options(kind).items():
        flag = flag_name(name, meta)
        methods = ", ".join(meta["defaults"])
        unset = all(v is None for v in meta["defaults"].values())
        help_text = f"{meta['help']} [{methods}{'' if unset else '; ' + _default_text(meta['defaults'])}]"
        if all(isinstance(v, bool) for v in meta["defaults"].values()):
            parser.add_argument(flag, dest=name, action="store_const", const=True, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=meta["type"] or str, choices=meta["choices"], default=None,
                                help=help_text)
        dests.append(name)
    return dests


def method_flag_values(args, kind: str) -> dict[str, Any]:
    """The method flags given on the command line (unset ones left out)."""
    from mpokit.methods.base import cli_options

    return {k: getattr(args, k) for k in cli_options(kind) if getattr(args, k, None) is not None}


def method_flags_given(args, kind: str) -> list[str]:
    """The method flags given on the command line, as typed (e.g. --kv-residual)."""
    from mpokit.methods.base import cli_options

    return [flag_name(k, m) for k, m in cli_options(kind).items() if getattr(args, k, None) is not None]


DTYPES = ("float32", "bfloat16", "float16")
DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"


def device_name(text: str) -> str:
    """argparse type for --device: the form only; whether the device is there is checked at run time."""
    name = text.strip().lower()
    if name in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", name):
        return name
    raise argparse.ArgumentTypeError(f"expected a device: {DEVICE_FORMS}, got {text!r}")


def add_device_flag(p, what: str) -> None:
    p.add_argument("--device", type=device_name, default="auto", metavar="{auto,cpu,cuda,cuda:N,mps}",
                   help=f"{what} (default auto: cuda when torch.cuda.is_available(), else cpu)")


def resolve_device(name: str):
    """The torch.device --device names; one that is not available here is a user error (exit 2)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"expected an available device, got {name}: torch.cuda.is_available() is False")
        index, count = int(name.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise UserError(f"expected an available device, got {name}: torch.cuda.device_count() is {count}")
    elif name == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"expected an available device, got {name}: torch.backends.mps.is_available() is False")
    return torch.device(name)


def add_runtime_flags(p) -> None:
    """--dtype and --kernel: how a loaded model computes (eval, and later compress/export)."""
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="compute dtype of the loaded model (default float32); bfloat16 runs 4-bit and per-row "
                        "8-bit quantized layers on torch's packed CPU kernels")
    from mpokit.layers.quant import KERNELS

    p.add_argument("--kernel", default="auto", choices=KERNELS,
                   help="quantized layers: auto = packed kernels for bfloat16 inputs; fast = also for float32 inputs "
                        "of a few rows (decoding), cast to bfloat16; always = for every input; reference = "
                        "dequantize and matmul in the compute dtype")


def apply_runtime(model, args) -> dict[str, Any]:
    """Cast the model to --dtype, move it to --device (when the command has one) and set --kernel; returns
    what to report (dtype, device, layers per kernel path: the packed kernels run on CPU tensors only)."""
    import torch

    from mpokit.layers.quant import set_kernel_

    model.to(getattr(torch, args.dtype))
    out = {"dtype": args.dtype}
    if getattr(args, "device", None) is not None:
        device = resolve_device(args.device)
        model.to(device)
        out["device"] = str(device)
    return {**out, "kernel": args.kernel, "kernel_paths": set_kernel_(model, args.kernel)}


def add_report_flag(p) -> None:
    p.add_argument("--report", default=None, metavar="HTML",
                   help="also write this run as one self-contained HTML page (as `mpokit report` does); an "
                        "existing file is refused (compress: replaced with --overwrite)")


def check_report(args) -> None:
    """Refuse a --report path before the run, not after it."""
    if getattr(args, "report", None):
        from mpokit.report import check_output

        check_output(args.report, getattr(args, "overwrite", False))


def emit_report(args, inputs: list, result: dict[str, Any] | None = None) -> None:
    """Write --report from `inputs` (checkpoint folders, JSON files) plus this run's `result`."""
    if not getattr(args, "report", None):
        return
    import tempfile
    from pathlib import Path

    from mpokit.report import write_report

    with tempfile.TemporaryDirectory(prefix="mpokit-report-") as tmp:
        if result is not None and not getattr(args, "json", None):  # the report reads results from files
            path = Path(tmp) / "result.json"
            path.write_text(json.dumps(result, default=str))
            inputs = [*inputs, path]
        elif result is not None:
            inputs = [*inputs, args.json]
        write_report(inputs, args.report, overwrite=getattr(args, "overwrite", False))
    print(f"wrote {args.report}", file=sys.stderr)
