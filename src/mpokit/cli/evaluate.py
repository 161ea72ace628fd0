"""mpokit eval: perplexity (and sizes) of a model or checkpoint; optionally abilities and lm-eval tasks."""
from __future__ import annotations

from mpokit.cli.common import (UserError, add_device_flag, add_method_flags, add_report_flag, add_runtime_flags,
                               apply_runtime, check_report, emit_json, emit_report, int_at_least, method_flag_values,
                               method_flags_given, nonnegative_int, positive_int, print_table, resolve_device)

DEFAULT_CHUNK = 64  # --chunk with --kv-cache
HELP = "perplexity over the first N tokens of a text in windows of L tokens, plus parameter/byte counts"


def add_arguments(p) -> None:
    p.add_argument("model", nargs="?", default=None, help="checkpoint folder, alias, .gguf or hub id (default: smollm2)")
    p.add_argument("--text", default=None, help="text file (default: offline pydoc corpus shipped with Python)")
    p.add_argument("--dataset", default=None, help="Hugging Face dataset 'name[:config[:split]]' (needs `datasets`)")
    p.add_argument("--tokens", type=int_at_least(2), default=8192, help="tokens to evaluate (default 8192)")
    p.add_argument("--context", type=int_at_least(2), default=512,
                   help="window length (default 512; at most the model's positions)")
    p.add_argument("--batch-size", type=positive_int, default=4)
    add_runtime_flags(p)
    add_device_flag(p, "where the model runs (perplexity, abilities and --lm-eval)")
    add_device_map_flags(p)
    from mpokit.methods.base import method_names

    p.add_argument("--kv-cache", default=None, choices=method_names("kv-cache"),
                   help="evaluate with a quantized KV cache in the loop (windows fed in --chunk pieces); "
                        "-kc: keys per channel over 64-token blocks + 4 16-bit sink tokens (better at 2 bits); "
                        "-kcr: also Hadamard-rotated values; -rk: keys rotated too (recommended at 4 bits); "
                        "-long: rk + 32-token key blocks + a 32-token 16-bit window (best at 2 bits)")
    add_method_flags(p, "kv-cache")  # each cache's own options, declared on its config
    p.add_argument("--chunk", type=positive_int, default=None,
                   help=f"feed each window in pieces of this many tokens through the cache (default {DEFAULT_CHUNK} "
                        f"with --kv-cache; must be below the window length so that later pieces read the cache)")
    p.add_argument("--abilities", action="store_true",
                   help="also score in-context learning (SST-2), CoT arithmetic and instruction following")
    p.add_argument("--lm-eval", action="append", default=None, metavar="TASK_OR_YAML",
                   help="also run lm-evaluation-harness: a registered task, group or tag name (arc_easy), or a path "
                        "to a task YAML file (its folder is searched for its includes; local data via dataset_path "
                        "json/csv and data_files needs no network); repeat for more tasks (needs `lm-eval`)")
    p.add_argument("--lm-eval-limit", type=positive_int, default=None,
                   help="with --lm-eval: at most this many examples per task (default: all)")
    p.add_argument("--lm-eval-fewshot", type=nonnegative_int, default=None,
                   help="with --lm-eval: few-shot examples per prompt (default: each task's own)")
    p.add_argument("--json", default=None, help="write results as JSON here")
    add_report_flag(p)


def add_device_map_flags(p) -> None:
    """--device-map, --max-memory, --offload-dir: a model larger than one device, placed by accelerate."""
    from mpokit.io.device_map import STRATEGIES

    p.add_argument("--device-map", default=None, choices=STRATEGIES,
                   help="spread the model over GPUs, CPU and disk with accelerate (whole decoder blocks per device; "
                        "auto and balanced: even over the GPUs, sequential: fill GPU 0 first); instead of --device")
    p.add_argument("--max-memory", default=None, metavar="DEVICE=SIZE,...",
                   help="with --device-map: memory each device may hold, e.g. cpu=2GiB,0=20GiB (GPU by index; "
                        "default: what is free)")
    p.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="with --device-map: weights that fit nowhere go to disk, in a fresh folder inside DIR "
                        "(created if missing) that is removed after the run")


def check_placement(args) -> dict | None:
    """load_model's device_map / max_memory for --device-map (None without it); its options alone are errors."""
    if args.device_map is None:
        given = [f for f, v in (("--max-memory", args.max_memory), ("--offload-dir", args.offload_dir))
                 if v is not None]
        if given:
            raise UserError(f"expected {', '.join(given)} only with --device-map, got it without")
        return None
    if args.device != "auto":
        raise UserError(f"expected either --device-map or --device, got both (--device-map {args.device_map} "
                        f"--device {args.device}): accelerate places every module under --device-map")
    from mpokit.io.device_map import parse_max_memory

    max_memory = None if args.max_memory is None else parse_max_memory(args.max_memory)
    return {"device_map": args.device_map, "max_memory": max_memory}


def placed_runtime(model, args) -> dict:
    """apply_runtime for a model accelerate has dispatched: it was loaded in --dtype and must not be moved
    (accelerate refuses .to() on a model with offloaded weights); returns what to report."""
    from mpokit.io.device_map import device_map_summary
    from mpokit.layers.quant import set_kernel_
    from mpokit.surgery.offload import input_device

    device = input_device(model)
    if device.type == "meta":  # perplexity, abilities and lm-eval send token ids to the first weight's device
        first = next(name for name, _ in model.named_parameters())
        raise UserError(f"expected the model's first weights ({first}) in memory under --device-map, got them "
                        f"offloaded by accelerate; raise --max-memory so that they fit")
    placement = {"strategy": args.device_map, "max_memory": args.max_memory, "offload_dir": args.offload_dir,
                 **(device_map_summary(model) or {})}
    return {"dtype": args.dtype, "device": str(device), "device_map": placement, "kernel": args.kernel,
            "kernel_paths": set_kernel_(model, args.kernel)}


def check_kv_options(args) -> int | None:
    """The chunk length to use; with --kv-cache a window must span more than one chunk, or the cache is never read."""
    if not args.kv_cache:
        given = method_flags_given(args, "kv-cache")
        if given:
            raise UserError(f"expected {', '.join(given)} only with --kv-cache, got it without")
        return args.chunk
    chunk = DEFAULT_CHUNK if args.chunk is None else args.chunk
    window = min(args.context, args.tokens)
    if window <= chunk:
        raise UserError(f"expected a window longer than --chunk with --kv-cache (each window is fed in chunks of "
                        f"{chunk} tokens, and only later chunks read the quantized cache), got a window of {window} "
                        f"tokens (--context {args.context}, --tokens {args.tokens}); raise --context or lower --chunk")
    return chunk


def check_lm_eval(args):
    """(TaskManager, task names) for --lm-eval, else None; its options without it are an error."""
    if not args.lm_eval:
        given = [f for f, v in (("--lm-eval-limit", args.lm_eval_limit), ("--lm-eval-fewshot", args.lm_eval_fewshot))
                 if v is not None]
        if given:
            raise UserError(f"expected {', '.join(given)} only with --lm-eval, got it without")
        return None
    from mpokit.integrations.lm_eval_adapter import task_manager_for

    return task_manager_for(args.lm_eval)


def run_lm_eval_tasks(model, tokenizer, tasks, args) -> dict:
    """Run the --lm-eval tasks on the loaded model; print one row per metric; returns the JSON part."""
    from mpokit.integrations.lm_eval_adapter import metric_rows, run_lm_eval, summarize_results

    manager, names = tasks
    res = run_lm_eval(model, names, tokenizer=tokenizer, num_fewshot=args.lm_eval_fewshot, limit=args.lm_eval_limit,
                      batch_size=args.batch_size, task_manager=manager, log_samples=False)
    summary = {"tasks": args.lm_eval, **summarize_results(res)}
    print_table(metric_rows(summary), ["task", "metric", "filter", "value", "stderr", "n"], title="lm-eval")
    return summary


def run(args) -> int:
    import torch

    from mpokit.eval.perplexity import load_corpus
    from mpokit.io.device_map import offload_workspace
    from mpokit.io.models import load_model

    chunk = check_kv_options(args)  # flags first, then files, then the model
    resolve_device(args.device)
    placement = check_placement(args)
    lm_tasks = check_lm_eval(args)
    check_report(args)
    kv = None
    if args.kv_cache:
        from mpokit.methods.presets import build_config

        kv = build_config(args.kv_cache, kind="kv-cache", **method_flag_values(args, "kv-cache"))
    corpus = load_corpus(args.text, args.dataset)  # fail on a bad path before loading the model
    with offload_workspace(args.offload_dir if placement else None) as offload:
        if placement is None:
            loaded = load_model(args.model)
            runtime = apply_runtime(loaded.model, args)
        else:
            loaded = load_model(args.model, dtype=getattr(torch, args.dtype), offload_folder=offload, **placement)
            runtime = placed_runtime(loaded.model, args)
            placed = runtime["device_map"]
            rows = [{"device": d, "modules": sum(v == d for v in placed.get("modules", {}).values()), "bytes": b}
                    for d, b in placed.get("bytes", {}).items()]
            print_table(rows, ["device", "modules", "bytes"], title="device map")
        return evaluate_loaded(args, loaded, runtime, corpus, chunk, kv, lm_tasks)


def evaluate_loaded(args, loaded, runtime, corpus, chunk, kv, lm_tasks) -> int:
    """Perplexity (with --kv-cache in the loop), sizes, then --abilities and --lm-eval; prints and writes JSON."""
    from mpokit.eval.perplexity import check_positions, perplexity
    from mpokit.eval.size import count_params, param_bytes, peak_device_mb, peak_rss_mb

    check_positions(loaded.model, min(args.context, args.tokens), "--context")
    factory = None
    if args.kv_cache:
        from mpokit.methods.kv_cache import KVCacheFactory

        factory = KVCacheFactory(kv, loaded.model.config)
    res = perplexity(loaded.model, loaded.tokenizer, corpus.text, tokens=args.tokens, context=args.context,
                     batch_size=args.batch_size, corpus_name=corpus.name, cache_factory=factory, chunk=chunk)
    if factory is not None and res.cache_reads == 0:
        raise UserError(f"expected the text to fill more than one chunk of {chunk} tokens, got {res.tokens} tokens "
                        f"from {corpus.name}: the quantized cache was never read, so no KV figure is reported")
    out = {"model": loaded.source, **res.to_dict(), "params": count_params(loaded.model),
           "bytes": param_bytes(loaded.model), "chunk": chunk, "peak_rss_mb": peak_rss_mb(),
           "peak_device_mb": peak_device_mb(), **runtime}
    columns = ["model", "corpus", "tokens", "context", "perplexity", "params", "bytes", "seconds"]
    if factory is not None:
        out.update(kv_cache=kv.method, kv_bits=kv.bits, kv_residual=kv.residual_length, kv_config=kv.to_dict(),
                   kv_bytes_ratio=factory.bytes_ratio(),
                   kv_eval=f"each window fed in chunks of {chunk} tokens through one cache: later chunks attend "
                           f"to the quantized states of earlier ones ({res.cache_reads} of {res.chunks} chunks "
                           f"read the cache); bytes vs a 16-bit cache at window end")
        columns[5:5] = ["kv_cache", "kv_bits", "kv_bytes_ratio"]
    print_table([out], columns)
    if args.abilities:
        from mpokit.eval.abilities import evaluate_abilities

        results = evaluate_abilities(loaded.model, loaded.tokenizer)
        out["abilities"] = {k: r.to_dict() for k, r in results.items()}
        print_table([{"name": k, "score": r.score, "n": r.n, "chance": r.chance, "seconds": r.seconds}
                     for k, r in results.items()], ["name", "score", "n", "chance", "seconds"], title="abilities")
    if lm_tasks is not None:
        out["lm_eval"] = run_lm_eval_tasks(loaded.model, loaded.tokenizer, lm_tasks, args)
    emit_json(args.json, out)
    from mpokit.io.checkpoint import is_checkpoint

    emit_report(args, [loaded.path] if loaded.path and is_checkpoint(loaded.path) else [], out)
    return 0
