"""Neuron-sparse checkpoints before and after a short distillation, against the dense model, same run (issue 17).

Scores the dense default model and each given checkpoint on WikiText-2 test and the licence texts (neither
tuned on: the compression calibrates on WikiText-2 valid, the distillation trains on the built-in mix, whose
WikiText-2 part is the valid split). Each checkpoint's methods, as recorded in its mpokit.json, go into the
JSON next to its perplexities. The checkpoints come from:

  mpokit compress --method dejavu --selector gate-lowrank --refit \
      --calibration ../shared/data/wikitext-2/valid.txt --out /tmp/dv-gl
  mpokit finetune /tmp/dv-gl --method kd --teacher smollm2 --alpha 0.75 --task lm --data mix --max-minutes 10 \
      --batch-size 4 --seq-len 256 --scheduler cosine --warmup-steps 4 --lr 1e-4 --out /tmp/dv-gl-kd
  python bench/bench_dejavu_kd.py /tmp/dv-gl /tmp/dv-gl-kd/model
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="mpokit checkpoints to score against the dense default model")
    p.add_argument("--tokens", type=int, default=8192, help="WikiText-2 test tokens")
    p.add_argument("--ood-tokens", type=int, default=4096, help="licence-text tokens")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "results" / "bench_dejavu_kd.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from mpokit.data.corpus import licenses_corpus
    from mpokit.eval import perplexity
    from mpokit.eval.table import print_table
    from mpokit.io.models import load_model

    texts = {"wikitext2_test": ((DATA / "test.txt").read_text(), args.tokens),
             "licences": (licenses_corpus().text, args.ood_tokens)}
    rows, base = [], None
    for name in [None, *args.checkpoints]:
        lm = load_model(name)
        ppl = {k: perplexity(lm.model.eval(), lm.tokenizer, text, tokens=n, context=args.context, progress=False,
                             corpus_name=k).perplexity for k, (text, n) in texts.items()}
        base = base or ppl
        meta = json.loads((Path(name) / "mpokit.json").read_text()) if name else {}
        rows.append({"model": name or "dense", "methods": meta.get("methods"),
                     **{f"ppl_{k}": v for k, v in ppl.items()},
                     **{f"x_dense_{k}": v / base[k] for k, v in ppl.items()}})
        print(json.dumps(rows[-1]), flush=True)
    print_table(rows, ["model", "ppl_wikitext2_test", "x_dense_wikitext2_test", "ppl_licences", "x_dense_licences"],
                title=f"WikiText-2 test {args.tokens} tokens, licences {args.ood_tokens}, context {args.context}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python bench/bench_dejavu_kd.py " + " ".join(sys.argv[1:])
    out.write_text(json.dumps({"bench": "dejavu_kd", "rows": rows, "command": command}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
