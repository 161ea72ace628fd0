"""mpokit compress: load a model, apply a method, save the result."""
from __future__ import annotations

import time

from mpokit.cli.common import (DTYPES, add_device_flag, add_method_flags, add_report_flag, check_report, emit_json,
                               emit_report, method_flag_values, module_names, print_table, regex, resolve_device)
from mpokit.methods.base import method_names
from mpokit.methods.presets import build_config, needs_calibration

HELP = "compress a model (default: the embedded SmolLM2-135M-Instruct) and save it"


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="model alias (smollm2, minilm), folder, .gguf or hub id")
    p.add_argument("--method", default="mpo", choices=method_names("compress"), help="compression method (default: mpo)")
    p.add_argument("--targets", default=None, help="comma-separated module names/suffixes (default per architecture)")
    p.add_argument("--targets-regex", type=regex, default=None, help="regular expression over full module names")
    p.add_argument("--exclude", default=None, help="comma-separated module names/suffixes to skip")
    p.add_argument("--calibration", default=None,
                   help="calibration text for activation-aware methods: a file, 'pydoc' (the offline Python docs "
                        "corpus) or 'mix' (the default where the shared data folder has its sources: WikiText-2 "
                        "valid, Python docs and SST-2 sentences; else pydoc)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="load, compress and save the model in this dtype (default float32)")
    add_device_flag(p, "where the model is put for compression: calibration and factorizations run there; the "
                       "checkpoint is written from CPU tensors either way")
    add_method_flags(p, "compress")  # each method's own options, declared on its config
    p.add_argument("--no-stream", action="store_true",
                   help="load the whole model before compressing (default: methods that can read one decoder block "
                        "at a time do so, from a safetensors folder or the embedded model, and hold one block)")
    p.add_argument("--offload-dir", default=None,
                   help="keep the calibration activations carried from block to block (and the sensitivity pass's "
                        "per-block states) on disk in a private folder under this one, removed at the end "
                        "(default: in memory)")
    p.add_argument("--out", required=True, help="output folder (written atomically; a new or empty folder)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is an existing mpokit checkpoint")
    p.add_argument("--max-shard-size", default="2GB",
                   help="largest weights file before the checkpoint is split into shards with an index (default 2GB)")
    p.add_argument("--json", default=None, help="write the compression report as JSON here")
    p.add_argument("--layers", action="store_true", help="print one row per layer")
    add_report_flag(p)


def run(args) -> int:
    from contextlib import nullcontext

    from mpokit.calibration.activations import offload_activations
    from mpokit.data import Calibration
    from mpokit.eval.size import param_bytes, peak_device_mb, peak_rss_mb
    from mpokit.io.checkpoint import check_save_path, save_compressed, shard_size
    from mpokit.io.device_map import check_offload_parent
    from mpokit.io.models import load_model
    from mpokit.methods.base import compress_
    from mpokit.surgery.offload import detach_offload

    if args.targets is not None and args.targets_regex is not None:
        raise ValueError("expected at most one of --targets and --targets-regex")
    targets = args.targets_regex if args.targets_regex is not None else module_names("--targets", args.targets)
    options = method_flag_values(args, "compress")
    config = build_config(args.method, target_modules=targets,
                          exclude_modules=module_names("--exclude", args.exclude), **options)
    # --calibration TEXT, else the default (the mix; the pydoc corpus without the data folder); the report names it
    calibration = Calibration.from_file(args.calibration) if needs_calibration(config) else None
    check_save_path(args.out, args.overwrite, protect=[args.model])  # refuse before spending time compressing
    if args.offload_dir is not None:
        check_offload_parent(args.offload_dir)
    shard_size(args.max_shard_size)
    check_report(args)
    device = resolve_device(args.device)
    import torch

    stream = config.streamable and not args.no_stream
    loaded = load_model(args.model, dtype=getattr(torch, args.dtype), stream=stream, device=device)
    model_mb = param_bytes(loaded.model) / 2**20  # the source model as loaded (before compression)
    if not loaded.streamed:  # a streamed model is built on `device` block by block
        loaded.model.to(device)
    start = time.perf_counter()
    kwargs = {"tokenizer": loaded.tokenizer, "calibration": calibration} if calibration else {}
    with offload_activations(args.offload_dir) if args.offload_dir else nullcontext():
        report = compress_(loaded.model, config, **kwargs)
    detach_offload(loaded.model)  # a streamed model: the weights no block pass replaced are read now
    seconds = time.perf_counter() - start
    loaded.model.to("cpu")
    peak = peak_rss_mb()  # load + compression (the save below streams tensors already in memory)
    out = {**report.to_dict(), "model": loaded.source, "method": args.method, "config": config.to_dict(),
           "seconds": seconds, "device": str(device), "streamed": loaded.streamed,
           "calibration": calibration.name if calibration else None, "offload_dir": args.offload_dir,
           "peak_rss_mb": peak, "model_mb": model_mb, "peak_rss_x_model": peak / model_mb if peak else None,
           "peak_device_mb": peak_device_mb()}
    save_compressed(loaded.model, args.out, loaded.tokenizer, extra={"source": loaded.source, "report": out},
                    overwrite=args.overwrite, protect=[args.model, loaded.path], max_shard_size=args.max_shard_size)
    if args.layers:
        rows = [{"layer": r.name, "shape": list(r.shape), "params": r.params_after, "kept": r.params_after / r.params_before,
                 "rel_error": r.rel_error, "bonds": r.detail.get("bonds")} for r in report.layers]
        print_table(rows, ["layer", "shape", "bonds", "params", "kept", "rel_error"])
    errors = [r.rel_error for r in report.layers if r.rel_error is not None]
    row = {"model": loaded.source, "method": args.method, "layers": len(report.layers),
           "params_before": report.params_before, "params_after": report.params_after, "kept": report.kept_fraction,
           "mean_rel_error": sum(errors) / len(errors) if errors else None, "seconds": seconds, "peak_rss_mb": peak,
           "bytes_after": report.extra.get("bytes_after"), "bits_per_weight": report.extra.get("bits_per_weight")}
    columns = ["model", "method", "layers", "params_before", "params_after", "kept", "mean_rel_error", "bytes_after",
               "bits_per_weight", "seconds", "peak_rss_mb"]
    print_table([row], [c for c in columns if row[c] is not None], title=f"saved to {args.out}")
    emit_json(args.json, {**out, "peak_rss_with_save_mb": peak_rss_mb()})
    emit_report(args, [args.out])
    return 0
