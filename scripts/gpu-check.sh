#!/usr/bin/env bash
# The checks that need a GPU (CI has none), in one run of under 10 minutes, each step with its own time limit so
# that one that hangs leaves the others' results. Logs and JSON go to OUT_DIR.
#   bash scripts/gpu-check.sh OUT_DIR TOKENIZER_DIR CALIBRATION_TEXT [bench_gpu.py options...]
# Each step's whole output is kept in OUT_DIR; the terminal gets its tail. TOKENIZER_DIR: the SmolLM2 tokenizer files
# (tokenizer*.json of the folder mpokit converts the embedded GGUF into, under ~/.cache/mpokit).
# 1. the `gpu`-marked tests; 2. `mpokit finetune` under accelerate's FSDP config with one process, through its
# final save, then the saved model evaluated; 3. bench/bench_gpu.py (compress, eval, finetune: cuda vs cpu).
set -u -o pipefail
out=${1:?output folder}; tok=${2:?tokenizer folder}; text=${3:?calibration text}; shift 3
mkdir -p "$out"
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.device_count(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$out/versions.txt"

timeout 150 python3 -m pytest -m gpu tests/test_device.py tests/test_device_map.py tests/test_fsdp.py \
  -p no:cacheprovider -q -rA > "$out/pytest_gpu.log" 2>&1; tail -12 "$out/pytest_gpu.log"

work=$(mktemp -d)
python3 - "$work" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from test_cli import save_model_and_text
save_model_and_text(Path(sys.argv[1]), 800)
PY
timeout 90 accelerate launch --config_file docs/configs/fsdp.yaml --num_processes 1 -m mpokit finetune \
  "$work/hf" --method full --task lm --data "$work/text.txt" --max-steps 4 --batch-size 2 --seq-len 32 \
  --tokens 256 --context 64 --out "$work/ft" --json "$out/fsdp_finetune.json" > "$out/fsdp.log" 2>&1
grep -v "it/s\]" "$out/fsdp.log" | grep -i -B2 -A8 "error\|Traceback" | head -60; tail -5 "$out/fsdp.log"
timeout 40 python3 -m mpokit eval "$work/ft/model" --text "$work/text.txt" --tokens 256 --context 64 \
  --device cuda --json "$out/fsdp_eval.json" 2>&1 | tail -4

timeout 290 python3 bench/bench_gpu.py --size 360M --tokenizer "$tok" --calibration "$text" \
  --json "$out/bench_gpu.json" --limit 100 "$@" 2>&1 | grep -v "it/s\]" | tee "$out/bench_gpu.log"
