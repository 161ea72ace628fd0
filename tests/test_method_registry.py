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
    finetune_names = method_names("finetune")
    if finetune_names:
        with pytest.raises(TypeError, match="expected a compression config"):
            mpokit.compress_(llama, METHODS[finetune_names[0]]())


def test_public_api_in_one_place():
    for name in ["compress_", "unload_", "save_compressed", "load_compressed", "load_model", *(
            c.__name__ for c in METHODS.values())]:
        assert hasattr(mpokit, name), name
    assert set(mpokit.__all__) >= {"compress_", "unload_", "save_compressed", "load_compressed", "AwareConfig"}
