"""FSDP (docs/configs/fsdp.yaml) with MPO layers: the config's keys, accelerate's FSDP2 sharding on 2 gloo CPU
processes, and (GPUs only) the whole Trainer path.

accelerate 1.16 turns `distributed_type: FSDP` into plain DDP (MULTI_CPU) when training on the CPU, so Trainer
cannot be tested with FSDP here; the CPU test drives accelerate's own `fsdp2_prepare_model` (what Trainer calls
under FSDP) with the plugin `accelerate launch` builds from the documented config.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

CONFIG = Path(__file__).resolve().parents[1] / "docs" / "configs" / "fsdp.yaml"


def _launcher():
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("accelerate launch is unavailable")
    return launcher


def _launch(tmp_path, script: str, extra: list[str], env: dict, port: int):
    path = tmp_path / "fsdp_train.py"
    path.write_text(script)
    cmd = [_launcher(), "launch", "--config_file", str(CONFIG), *extra, "--main_process_port", str(port), str(path),
           str(tmp_path), str(Path(__file__).parent)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def _launch_args():
    from accelerate.commands.launch import launch_command_parser

    return launch_command_parser().parse_args(["--config_file", str(CONFIG), "script.py"])


def test_fsdp_config_keys_are_known_to_installed_accelerate():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    cfg = ClusterConfig.from_yaml_file(str(CONFIG))  # refuses unknown top-level keys
    assert cfg.distributed_type == DistributedType.FSDP and cfg.fsdp_config["fsdp_version"] == 2
    # fsdp_config's keys are copied onto launch arguments by name, unchecked: a typo would be silently ignored
    args = _launch_args()
    unknown = [k for k in yaml.safe_load(CONFIG.read_text())["fsdp_config"] if not hasattr(args, k)]
    assert unknown == []
    assert not hasattr(args, "fsdp_reshard_after_fwd")  # negative control: a misspelt key is caught


FSDP_SCRIPT = r'''
import json, os, sys, types, torch
sys.path.insert(0, sys.argv[2])
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from conftest import tiny_llama
from mpokit.io.checkpoint import load_compressed, save_compressed
from mpokit.methods.mpop import decompose_, mpop_

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
out_dir = sys.argv[1]

def build(seed):
    torch.manual_seed(seed)
    m = tiny_llama()
    decompose_(m, target_modules=["up_proj"])  # MPOLinear: cores in a ParameterList
    mpop_(m)  # central cores frozen, auxiliary cores train: frozen and trained parameters in one FSDP unit
    return m.train()

def shard(model, broadcast):
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables `accelerate launch` set from the config
    # The config's fsdp_cpu_ram_efficient_loading (rank 0's weights broadcast) is switched off at launch on CPU,
    # where accelerate refuses fsdp_sync_module_states, which the launcher requires with it; FSDP2 needs only this:
    plugin.cpu_ram_efficient_loading = broadcast
    acc = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no",
                                is_main_process=rank == 0, device=torch.device("cpu"))
    return fsdp2_prepare_model(acc, model), plugin

def gathered(model):
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # full, on every rank

def max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)

init0 = build(0).state_dict()
model, plugin = shard(build(rank), broadcast=True)  # rank 1 starts from other weights: rank 0's must win
params = list(model.parameters())
info = {"world": world, "backend": dist.get_backend(), "version": plugin.fsdp_version,
        "wrap": [type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)],
        "dtensor": all(isinstance(p, DTensor) for p in params),
        "local": sum(p.to_local().numel() for p in params), "full": sum(p.numel() for p in params),
        "start_vs_rank0": max_diff(gathered(model), init0)}
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
for _ in range(3):
    mine = ids[2 * rank:2 * rank + 2]  # each rank its half of the batch
    model(input_ids=mine, labels=mine).loss.backward()
    opt.step()
    opt.zero_grad()
trained = gathered(model)
with torch.no_grad():
    logits = model(input_ids=ids).logits
info["sum"] = float(sum(v.double().sum() for v in trained.values()))
if rank == 0:
    ref = build(0)  # one process, the whole batch: what data-parallel training must reproduce
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    half = build(0)  # control: rank 0's half batch alone
    half_opt = torch.optim.AdamW([p for p in half.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        for m, o, x in ((ref, ref_opt, ids), (half, half_opt, ids[:2])):
            m(input_ids=x, labels=x).loss.backward()
            o.step()
            o.zero_grad()
    info["keys_match"] = set(trained) == set(ref.state_dict())
    info["vs_reference"] = max_diff(trained, ref.state_dict())
    info["vs_half_batch"] = max_diff(trained, half.state_dict())
    info["vs_init"] = max_diff(trained, init0)
    plain = build(5)  # the way out of FSDP: a plain model loads the gathered weights, then mpokit saves it
    plain.load_state_dict(trained)
    with torch.no_grad():
        info["reload_logit_diff"] = float((plain(input_ids=ids).logits - logits).abs().max())
    back = load_compressed(save_compressed(plain.eval(), os.path.join(out_dir, "model")))
    info["saved_equal"] = all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                                back.state_dict().values()))
control, _ = shard(build(rank), broadcast=False)  # without the broadcast each rank keeps its own shard
info["no_broadcast_vs_rank0"] = max_diff(gathered(control), init0)
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(info, f)
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_accelerate_launch_fsdp_two_cpu_processes(tmp_path):
    ranks = _launch(tmp_path, FSDP_SCRIPT, ["--num_processes", "2", "--mixed_precision", "no",
                                            "--fsdp_cpu_ram_efficient_loading", "false",
                                            "--fsdp_sync_module_states", "false"],
                    {"CUDA_VISIBLE_DEVICES": ""}, port=29561)
    r0 = ranks[0]
    for r in ranks:
        assert r["world"] == 2 and r["backend"] == "gloo" and r["version"] == 2
        assert r["wrap"].count("FSDPLlamaDecoderLayer") == 2 and r["wrap"][0] == "FSDPLlamaForCausalLM"  # per block
        assert r["dtensor"] and r["local"] < r["full"]  # really sharded: each rank holds part of the weights
        assert r["start_vs_rank0"] == 0.0  # rank 1's different start was replaced by rank 0's
        assert r["no_broadcast_vs_rank0"] > 1e-2  # negative control: without the broadcast it is not
    assert ranks[0]["local"] + ranks[1]["local"] >= r0["full"]
    assert ranks[0]["sum"] == ranks[1]["sum"]  # both ranks gather the same weights
    assert r0["keys_match"] and r0["vs_reference"] < 1e-5  # = one process on the whole batch
    assert r0["vs_half_batch"] > 100 * max(r0["vs_reference"], 1e-7)  # control: gradients were averaged
    assert r0["vs_init"] > 1e-3  # the auxiliary cores trained
    assert r0["reload_logit_diff"] < 1e-5 and r0["saved_equal"]


TRAINER_SCRIPT = r'''
import json, os, sys, torch
sys.path.insert(0, sys.argv[2])
torch.manual_seed(0)
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from accelerate.state import AcceleratorState
from conftest import ByteTokenizer as Tok, tiny_llama
from mpokit.io.checkpoint import load_compressed, save_compressed
from mpokit.methods.mpop import decompose_, mpop_
from mpokit.train import TextWindows, fit


def build():
    torch.manual_seed(0)
    m = tiny_llama()
    decompose_(m, target_modules=["up_proj"])
    mpop_(m)
    return m

model = build()
init = float(sum(v.double().sum() for v in model.state_dict().values()))
res = fit(model, TextWindows(Tok(), "hello distributed world. " * 40, seq_len=16), sys.argv[1], max_steps=2,
          batch_size=2, lr=1e-3, use_cpu=False)
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # rank 0
rank = dist.get_rank()
out = {"world": dist.get_world_size(), "backend": dist.get_backend(), "step": res.global_step,
       "type": str(AcceleratorState().distributed_type), "fsdp": isinstance(model, FSDPModule), "init": init}
full_dev = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # every rank
out["sum"] = float(sum(v.double().sum().cpu() for v in full_dev.values()))
if rank == 0:
    plain = build()
    plain.load_state_dict(full)
    back = load_compressed(save_compressed(plain.eval(), os.path.join(sys.argv[1], "model")))
    out["saved_equal"] = all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), back.state_dict().values()))
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
'''


@pytest.mark.gpu
@pytest.mark.slow
def test_accelerate_launch_fsdp_trainer_two_gpus(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices, found {torch.cuda.device_count()}")
    ranks = _launch(tmp_path, TRAINER_SCRIPT, ["--num_processes", "2"], {"CUDA_VISIBLE_DEVICES": "0,1"}, port=29562)
    for r in ranks:
        assert r["world"] == 2 and "nccl" in r["backend"] and r["step"] == 2
        assert r["type"] == "DistributedType.FSDP" and r["fsdp"]  # Trainer sharded the model in place
    assert ranks[0]["sum"] == ranks[1]["sum"] and ranks[0]["sum"] != ranks[0]["init"]  # agree, and it trained
    assert ranks[0]["saved_equal"]
