"""Every bad input to inject / AdapterConfig gets a message naming what is wrong."""

from __future__ import annotations

import pytest
import torch

import leanlora
from conftest import tiny_bert, tiny_llama


def test_pattern_that_matches_nothing_lists_near_misses():
    with pytest.raises(leanlora.InjectError, match=r"'q_prj'.*did you mean.*q_proj"):
        leanlora.inject(tiny_llama(), leanlora.AdapterConfig(target_modules=("q_prj",)))


def test_unsupported_layer_type_is_named():
    with pytest.raises(leanlora.InjectError, match=r"embed_tokens.*Embedding.*not a supported layer type"):
        leanlora.inject(tiny_llama(), leanlora.AdapterConfig(target_modules=("embed_tokens",)))


def test_glob_and_regex_skip_non_linear_modules():
    model = tiny_llama()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("re:.*layers\\.0\\..*",), r=2))
    names = [n for n, _ in leanlora.adapted_layers(model)]
    assert len(names) == 7 and all(".layers.0." in n for n in names)


def test_glob_matches_leaf_names_and_exclude_wins():
    model = tiny_llama()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("*_proj",), exclude_modules=("down_proj",), r=2))
    names = [n for n, _ in leanlora.adapted_layers(model)]
    assert len(names) == 12 and not any("down_proj" in n for n in names)


def test_filter_fn_can_veto():
    model = tiny_llama()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("q_proj",), r=2),
                    filter_fn=lambda module, name: ".layers.1." in name)
    assert [n for n, _ in leanlora.adapted_layers(model)] == ["model.layers.1.self_attn.q_proj"]


def test_invalid_regex_is_reported():
    with pytest.raises(leanlora.InjectError, match="not a valid regex"):
        leanlora.inject(tiny_llama(), leanlora.AdapterConfig(target_modules=("re:(",)))


def test_rank_larger_than_layer_names_module():
    with pytest.raises(leanlora.ConfigError, match=r"r=100 is invalid for module 'model.layers.0.self_attn.k_proj'.*min\(in, out\) = 32"):
        leanlora.inject(tiny_llama(), leanlora.AdapterConfig(target_modules=("k_proj",), r=100))


@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, r"r=0 is invalid: must be an integer > 0"),
    ({"r": -3}, r"r=-3 is invalid"),
    ({"alpha": 0}, r"alpha=0 is invalid: must be > 0"),
    ({"dropout": 1.0}, r"dropout=1.0 is invalid: must be in \[0, 1\)"),
    ({"dropout": -0.1}, r"dropout=-0.1 is invalid"),
    ({"target_modules": ()}, r"target_modules=\(\) is invalid"),
    ({"factors": "sparse"}, r"factors='sparse' is invalid: allowed: 'dense', 'bank'"),
    ({"ranks": "auto"}, r"ranks='auto' is invalid"),
    ({"precision": "int3"}, r"precision='int3' is invalid"),
    ({"base": "gptq"}, r"base='gptq' is invalid"),
])
def test_config_validation_messages(kwargs, message):
    with pytest.raises(leanlora.ConfigError, match=message):
        leanlora.AdapterConfig(**kwargs)


def test_config_from_dict_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(leanlora.ConfigError, match=r"adapter: unknown key\(s\) \['rank'\]"):
        leanlora.AdapterConfig.from_dict({"rank": 8})
    with pytest.raises(leanlora.ConfigError, match=r"adapter.r: expected an integer, got str"):
        leanlora.AdapterConfig.from_dict({"r": "8"})
    with pytest.raises(leanlora.ConfigError, match=r"adapter.bank: unknown key\(s\) \['size'\]"):
        leanlora.AdapterConfig.from_dict({"bank": {"size": 3}})


def test_config_round_trips_through_dict():
    cfg = leanlora.AdapterConfig(target_modules=("q_proj", "v_proj"), r=4, alpha=8, ranks="nested")
    assert leanlora.AdapterConfig.from_dict(cfg.to_dict()) == cfg


def test_inject_twice_is_refused():
    model = tiny_llama()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("q_proj",), r=2))
    with pytest.raises(leanlora.InjectError, match="already holds leanlora adapters"):
        leanlora.inject(model, leanlora.AdapterConfig(target_modules=("v_proj",), r=2))


def test_modules_to_save_that_matches_nothing():
    with pytest.raises(leanlora.InjectError, match=r"modules_to_save pattern 'clasifier'.*classifier"):
        leanlora.inject(tiny_bert(), leanlora.AdapterConfig(target_modules=("query",), modules_to_save=("clasifier",)))


def test_plain_torch_model_is_supported():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("0", "2"), r=2))
    assert len(list(leanlora.adapted_layers(model))) == 2
    assert model(torch.randn(3, 8)).shape == (3, 4)
