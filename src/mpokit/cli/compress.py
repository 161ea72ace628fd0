"""mpokit compress: load a model, apply a method, save the result."""
from __future__ import annotations

import time

from mpokit.cli.common import emit_json, module_names, print_table, regex
from mpokit.methods.presets import PRESETS, build_config, needs_calibration

# argparse dests passed to the method's config when given; each must equal a config field name.
# A method package adding a flag adds its dest here (an option that does not apply to the
# chosen --method is reported as an error by build_config).
CONFIG_OPTIONS = ["budget", "max_bond", "cutoff", "num_cores", "calibration_tokens", "bits", "group_size",
                  "num_experts", "top_k", "shared_experts", "refit", "groups"]

HELP = "compress a model (default: the embedded SmolLM2-135M-Instruct) and save it"


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="model alias (smollm2, minilm), folder, .gguf or hub id")
    p.add_argument("--method", default="mpo", choices=sorted(PRESETS), help="compression method (default: mpo)")
    p.add_argument("--budget", type=float, default=None, help="fraction of targeted parameters to keep, in (0,1]")
    p.add_argument("--max-bond", type=int, default=None, help="cap on every bond dimension")
    p.add_argument("--cutoff", type=float, default=None, help="relative error target per layer")
    p.add_argument("--num-cores", type=int, default=None, help="cores per matrix (default per method)")
    p.add_argument("--targets", default=None, help="comma-separated module names/suffixes (default per architecture)")
    p.add_argument("--targets-regex", type=regex, default=None, help="regular expression over full module names")
    p.add_argument("--exclude", default=None, help="comma-separated module names/suffixes to skip")
    p.add_argument("--calibration", default=None,
                   help="calibration text file for activation-aware methods (default: offline pydoc corpus)")
    p.add_argument("--calibration-tokens", type=int, default=None, help="calibration tokens (default 8192)")
    p.add_argument("--bits", type=int, default=None, help="weight bits for --method quant: 2, 3, 4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=None, help="columns per quantization group (default 128)")
    p.add_argument("--experts", dest="num_experts", type=int, default=None,
                   help="experts per FFN for --method moefication (default 32) / mpoe (default 8)")
    p.add_argument("--top-k", type=int, default=None, help="experts computed per token (moefication, mpoe)")
    p.add_argument("--shared-experts", type=int, default=None,
                   help="--method moefication: experts' worth of top neurons every token computes (default 0)")
    p.add_argument("--refit", action="store_const", const=True, default=None,
                   help="--method moefication: refit the down projections to the routed selection (least squares)")
    p.add_argument("--groups", type=int, default=None,
                   help="--method share: layers per group sharing a central core (1 = none, 0 = all; default 0)")
    p.add_argument("--out", required=True, help="output folder (written atomically; a new or empty folder)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is an existing mpokit checkpoint")
    p.add_argument("--json", default=None, help="write the compression report as JSON here")
    p.add_argument("--layers", action="store_true", help="print one row per layer")


def run(args) -> int:
    from mpokit.data.corpus import load_corpus
    from mpokit.io.checkpoint import check_save_path, save_compressed
    from mpokit.io.models import load_model
    from mpokit.methods.base import compress_

    if args.targets is not None and args.targets_regex is not None:
        raise ValueError("expected at most one of --targets and --targets-regex")
    targets = args.targets_regex if args.targets_regex is not None else module_names("--targets", args.targets)
    options = {k: getattr(args, k, None) for k in CONFIG_OPTIONS}
    config = build_config(args.method, target_modules=targets,
                          exclude_modules=module_names("--exclude", args.exclude), **options)
    calibration = load_corpus(args.calibration) if needs_calibration(config) else None
    check_save_path(args.out, args.overwrite, protect=[args.model])  # refuse before spending time compressing
    loaded = load_model(args.model)
    start = time.perf_counter()
    kwargs = {"tokenizer": loaded.tokenizer, "calibration_text": calibration.text} if calibration else {}
    report = compress_(loaded.model, config, **kwargs)
    seconds = time.perf_counter() - start
    out = {**report.to_dict(), "model": loaded.source, "method": args.method, "config": config.to_dict(),
           "seconds": seconds, "calibration": calibration.name if calibration else None}
    save_compressed(loaded.model, args.out, loaded.tokenizer, extra={"source": loaded.source, "report": out},
                    overwrite=args.overwrite, protect=[args.model, loaded.path])
    if args.layers:
        rows = [{"layer": r.name, "shape": list(r.shape), "params": r.params_after, "kept": r.params_after / r.params_before,
                 "rel_error": r.rel_error, "bonds": r.detail.get("bonds")} for r in report.layers]
        print_table(rows, ["layer", "shape", "bonds", "params", "kept", "rel_error"])
    errors = [r.rel_error for r in report.layers if r.rel_error is not None]
    print_table([{"model": loaded.source, "method": args.method, "layers": len(report.layers),
                  "params_before": report.params_before, "params_after": report.params_after,
                  "kept": report.kept_fraction, "mean_rel_error": sum(errors) / len(errors) if errors else None,
                  "seconds": seconds}],
                ["model", "method", "layers", "params_before", "params_after", "kept", "mean_rel_error", "seconds"],
                title=f"saved to {args.out}")
    emit_json(args.json, out)
    return 0
