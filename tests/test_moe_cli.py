"""CLI for experts and sharing on the real default model (slow: loads SmolLM2), kept to 1-2 layers each."""
from __future__ import annotations

import pytest

from mpokit import load_compressed
from mpokit.cli.main import main
from mpokit.layers import MPOLinear
from mpokit.layers.moe import MoEFFN
from mpokit.layers.mpoe import MPOEFFN
from mpokit.layers.sparse_ffn import NeuronSparseFFN

pytestmark = pytest.mark.slow


def test_cli_moefication_one_layer(tmp_path):
    out = tmp_path / "moe"
    assert main(["compress", "--method", "moefication", "--experts", "32", "--top-k", "8", "--targets-regex",
                 r"model\.layers\.0\.mlp", "--calibration-tokens", "256", "--out", str(out)]) == 0
    model = load_compressed(out)
    moe = model.model.layers[0].mlp
    assert isinstance(moe, MoEFFN) and moe.num_experts == 32 and moe.top_k == 8 and moe.gated
    assert not isinstance(model.model.layers[1].mlp, MoEFFN)


def test_cli_moefication_shared_refit_one_layer(tmp_path):
    out = tmp_path / "moe"
    assert main(["compress", "--method", "moefication", "--experts", "32", "--shared-experts", "6", "--refit",
                 "--targets-regex", r"model\.layers\.0\.mlp", "--calibration-tokens", "2048", "--out", str(out)]) == 0
    moe = load_compressed(out).model.layers[0].mlp
    assert isinstance(moe, MoEFFN) and moe.shared_experts == 6 and moe.top_k == 2  # 25% active in total
    assert main(["compress", "--method", "moefication-refit", "--targets-regex", r"model\.layers\.0\.mlp",
                 "--calibration-tokens", "2048", "--out", str(tmp_path / "preset")]) == 0
    assert load_compressed(tmp_path / "preset").model.layers[0].mlp.shared_experts == 6


def test_cli_share_and_mpoe(tmp_path):
    assert main(["compress", "--method", "share", "--groups", "0", "--max-bond", "16", "--targets-regex",
                 r"model\.layers\.[01]\.self_attn\.q_proj", "--out", str(tmp_path / "share")]) == 0
    model = load_compressed(tmp_path / "share")
    q0, q1 = (model.model.layers[i].self_attn.q_proj for i in (0, 1))
    assert isinstance(q0, MPOLinear) and q0.cores[1] is q1.cores[1]
    assert main(["compress", "--method", "mpoe", "--experts", "2", "--top-k", "1", "--targets-regex",
                 r"model\.layers\.29\.mlp", "--out", str(tmp_path / "mpoe")]) == 0
    assert isinstance(load_compressed(tmp_path / "mpoe").model.layers[29].mlp, MPOEFFN)
    with pytest.raises(SystemExit):  # --groups does not apply to moefication
        main(["compress", "--method", "moefication", "--groups", "2", "--out", str(tmp_path / "x")])


def test_cli_dejavu_one_layer_and_its_refusals(tmp_path, capsys):
    out = tmp_path / "dejavu"
    assert main(["compress", "--method", "dejavu", "--selector", "gate-lowrank", "--predictor-rank", "32", "--refit",
                 "--targets-regex", r"model\.layers\.0\.mlp", "--calibration-tokens", "1024", "--out", str(out)]) == 0
    layer = load_compressed(out).model.layers[0].mlp
    assert isinstance(layer, NeuronSparseFFN) and layer.selector == "gate-lowrank" and layer.keep == 1536 // 4
    assert layer.low_rank == 32 and layer.basis.abs().sum() > 0  # the fitted estimator was saved
    for bad, message in ((["--selector", "psychic"], "selector"), (["--keep-fraction", "0"], "keep_fraction")):
        with pytest.raises(SystemExit) as exit_info:
            main(["compress", "--method", "dejavu", *bad, "--out", str(tmp_path / "x")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
