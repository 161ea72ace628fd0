"""Self-contained transformers folders (`mpokit export --format hf`) against the mpokit checkpoint.

For each NAME:CKPT:FOLDER argument: logits of the first 64 WikiText-2 test tokens and 3 greedy
tokens from `load_compressed(CKPT)`, and from FOLDER loaded by plain transformers in a `python -S`
process where mpokit cannot be imported; max abs logit difference, sizes, load times.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_export_hf.py int4-g64:/tmp/hf-src:/tmp/hf-out-int4
"""
import json, subprocess, sys, sysconfig, time
from pathlib import Path
import torch
import mpokit
from mpokit.io.models import checkpoint_tokenizer

LOAD = r'''
import sys, time; sys.modules["mpokit"] = None
import torch, transformers
folder, io = sys.argv[1], sys.argv[2]
t = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
load_s = time.perf_counter() - t
x = torch.load(io + "/x.pt")
with torch.no_grad():
    logits = model(x).logits
    new = model.generate(x, max_new_tokens=3, do_sample=False)[0, x.shape[1]:]
torch.save({"logits": logits, "load_s": load_s, "new": new}, io + "/back.pt")
'''
torch.set_num_threads(1)
for name, ckpt, out in [(a, Path(b), Path(c)) for a, b, c in (s.split(":") for s in sys.argv[1:])]:
    tok = checkpoint_tokenizer(ckpt)
    x = torch.tensor([tok((Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "test.txt").read_text()[:2000])["input_ids"][:64]])
    t = time.perf_counter()
    model = mpokit.load_compressed(ckpt)
    mpokit_load_s = time.perf_counter() - t
    with torch.no_grad():
        ref, ref_new = model(x).logits, model.generate(x, max_new_tokens=3, do_sample=False)[0, 64:]
    io = out.parent / (out.name + "-io")
    io.mkdir(exist_ok=True)
    torch.save(x, io / "x.pt")
    paths = ":".join(dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]))
    env = {"PYTHONPATH": paths, "PATH": "/usr/bin:/bin", "HOME": str(io), "OMP_NUM_THREADS": "1",
           "HF_MODULES_CACHE": str(io / "modules"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-S", "-c", LOAD, str(out), str(io)], env=env, check=True)
    back = torch.load(io / "back.pt")
    print(json.dumps({"variant": name, "max_abs_diff": float((back["logits"] - ref).abs().max()),
                      "logit_scale": float(ref.abs().max()), "same_3_tokens": bool(torch.equal(back["new"], ref_new)),
                      "ckpt_mb": sum(p.stat().st_size for p in ckpt.iterdir()) / 1e6,
                      "hf_mb": sum(p.stat().st_size for p in out.iterdir()) / 1e6,
                      "mpokit_load_s": mpokit_load_s, "hf_load_s": back["load_s"]}))
