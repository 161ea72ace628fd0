"""One name per method: CLI name == config.method == registry key; handlers found along the MRO."""
from __future__ import annotations

import dataclasses

import pytest

import mpokit
from mpokit.methods.base import METHODS, config_from_dict, get_method, handler_for, method_names
from mpokit.methods.presets import PRESETS, build_config


def test_every_registered_name_is_its_configs_method():
    assert METHODS, "nothing registered"
    for name, cls in METHODS.items():
        assert cls.method == name and cls.__dict__["method"] == name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_cli_name_builds_a_config_with_that_name_and_a_handler(name):
    config = build_config(name)
    assert config.method == name and config.to_dict()["method"] == name
    assert handler_for(config) is not None
    assert type(config_from_dict(config.to_dict())) is type(config)


def test_presets_are_the_old_field_values():
    """The presets that were dicts of field values are now subclasses with those defaults."""
    expected = {
        "mpo": {"layouts": ("lowrank",)}, "mpo-3core": {"layouts": ("lowrank", "mpo")},
        "aware-global": {"sensitivity": "none", "error_norm": "relative"},
        "whitened-svd": {"scaling": "whiten", "sensitivity": "none", "allocation": "uniform", "correct": False},
        "asvd": {"scaling": "diag", "sensitivity": "none", "allocation": "uniform"},
        "svd": {"scaling": "none", "sensitivity": "none", "allocation": "uniform"},
        "mpo-datafree": {"num_cores": 3},
        "gptq": {"algorithm": "gptq", "act_order": True, "clip_search": True},
        "moefication-refit": {"shared_experts": 6, "refit": True, "top_k": 2},
    }
    for name, fields in expected.items():
        config = dataclasses.asdict(build_config(name))
        assert {k: config[k] for k in fields} == fields, name


def test_version_1_records_keep_their_meaning():
    assert type(config_from_dict({"method": "mpo-aware", "version": 1, "budget": 0.7})) is mpokit.AwareConfig
    assert type(config_from_dict({"method": "mpo", "version": 1, "num_cores": 3})) is mpokit.MPOConfig
    assert type(config_from_dict({"method": "mpo", "version": 2})) is mpokit.AwareConfig


def test_unknown_and_wrong_kind_are_clear_errors(llama):
    with pytest.raises(ValueError, match="unknown method .nope."):
        get_method("nope")
    with pytest.raises(ValueError, match="do not apply"):
        build_config("svd", bits=4)
    with pytest.raises(TypeError, match="expected a compression config"):
        mpokit.compress_(llama, mpokit.FullConfig())
    with pytest.raises(TypeError, match="make_kv_cache"):
        mpokit.compress_(llama, mpokit.RTNKVConfig())


def test_public_api_in_one_place():
    for name in ["compress_", "unload_", "save_compressed", "load_compressed", "load_model", *(
            c.__name__ for c in METHODS.values())]:
        assert hasattr(mpokit, name), name
    assert set(mpokit.__all__) >= {"compress_", "unload_", "save_compressed", "load_compressed", "AwareConfig"}


def test_every_kind_has_its_methods():
    assert method_names("finetune") == ["full", "kd", "lora", "mpop", "opdf", "opf", "recover"]
    assert method_names("kv-cache") == ["decoquant", "decoquant-kc", "decoquant-kcr", "decoquant-long", "decoquant-rk",
                                        "quanto", "rtn", "rtn-kc", "rtn-kcr", "rtn-long"]
    for kind in ("compress", "finetune", "kv-cache"):
        for name in method_names(kind):
            options = {"teacher": "t"} if name in ("kd", "opdf") else {}
            assert build_config(name, kind, **options).method == name


def test_kv_presets_are_the_old_settings():
    """The KV presets that were dicts of DecoQuantCache arguments are now configs with those defaults."""
    old = {
        "decoquant": {"small_dim": 16, "residual_length": 16},
        "rtn": {"small_dim": None, "residual_length": 16},
        "decoquant-kc": {"small_dim": 16, "key_group": 64, "sink_length": 4, "residual_length": 0},
        "rtn-kc": {"small_dim": None, "key_group": 64, "sink_length": 4, "residual_length": 0},
        "decoquant-kcr": {"small_dim": 16, "key_group": 64, "sink_length": 4, "residual_length": 0, "rotate": True},
        "rtn-kcr": {"small_dim": None, "key_group": 64, "sink_length": 4, "residual_length": 0, "rotate": True},
    }
    base = {"key_group": None, "sink_length": 0, "rotate": False, "token_group": None, "bits": 4}
    for name, settings in old.items():
        config = dataclasses.asdict(build_config(name, "kv-cache"))
        want = {**base, **settings}
        assert {k: config[k] for k in want} == want, name


def test_finetune_options_refer_to_their_method(tmp_path):
    from mpokit.train.recipes import FinetuneOptions

    common = dict(model=None, task="lm", data="x", max_steps=1, out=str(tmp_path))
    assert isinstance(FinetuneOptions(method="mpop", **common).method, mpokit.MPOPConfig)
    with pytest.raises(ValueError, match="expected --teacher for --method opdf"):
        FinetuneOptions(method="opdf", **common)
    with pytest.raises(ValueError, match="unknown method 'quant'"):
        FinetuneOptions(method="quant", **common)  # a compression method is not a fine-tuning one
    with pytest.raises(ValueError, match="--opf-count do not apply to --method mpop"):
        build_config("mpop", "finetune", count=2)


def test_flags_come_from_the_configs():
    """Each method's options are declared on its config; the CLI offers them with the same names as before."""
    import argparse

    from mpokit.cli import compress, evaluate, finetune

    def flags(module):
        p = argparse.ArgumentParser()
        module.add_arguments(p)
        return {s for a in p._actions for s in a.option_strings}

    assert flags(compress) >= {"--budget", "--max-bond", "--cutoff", "--num-cores", "--calibration-tokens", "--bits",
                               "--group-size", "--experts", "--top-k", "--shared-experts", "--refit", "--groups"}
    assert flags(finetune) >= {"--num-cores", "--squeeze-bond", "--squeeze-steps", "--select", "--opf-count",
                               "--opf-extra", "--teacher", "--alpha", "--beta", "--lora-rank", "--lora-targets"}
    assert flags(evaluate) >= {"--kv-bits", "--kv-residual"}
