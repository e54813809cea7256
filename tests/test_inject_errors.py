"""Every bad input to inject / AdapterConfig gets a message naming what is wrong."""

from __future__ import annotations

import pytest
import torch

import leanlora
from conftest import tiny_bert, tiny_gpt2, tiny_llama


def test_entry_that_matches_nothing_lists_near_misses():
    with pytest.raises(leanlora.InjectError, match=r"entry 'q_prj'.*did you mean.*q_proj"):
        leanlora.inject(tiny_llama(), leanlora.AdapterConfig(target_modules=("q_prj",)))


def test_unsupported_layer_type_is_named():
    with pytest.raises(leanlora.InjectError, match=r"embed_tokens.*Embedding.*not a supported layer type"):
        leanlora.inject(tiny_llama(), leanlora.AdapterConfig(target_modules=("embed_tokens",)))


def test_a_string_is_a_full_match_regex_that_skips_non_linear_modules():
    model = tiny_llama()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=r".*layers\.0\..*", r=2))
    names = [n for n, _ in leanlora.adapted_layers(model)]
    assert len(names) == 7 and all(".layers.0." in n for n in names)


def test_exclude_wins_over_targets():
    model = tiny_llama()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=r".*_proj", exclude_modules=("down_proj",), r=2))
    names = [n for n, _ in leanlora.adapted_layers(model)]
    assert len(names) == 12 and not any("down_proj" in n for n in names)


def test_a_regex_string_that_matches_only_a_suffix_says_to_give_a_list():
    with pytest.raises(leanlora.InjectError, match=r"regex 'q_proj' matches no module.*whole dotted name.*"
                                                   r"give a list: \['q_proj'\]"):
        leanlora.inject(tiny_llama(), leanlora.AdapterConfig(target_modules="q_proj"))


def test_names_separated_by_commas_in_one_string_say_to_give_a_list():
    """`target_modules: q_proj, v_proj` in YAML is one string (a regex matching nothing)."""
    with pytest.raises(leanlora.InjectError, match=r"'q_proj, v_proj' is one string.*give a list: \[q_proj, v_proj\]"):
        leanlora.inject(tiny_llama(), leanlora.AdapterConfig(target_modules="q_proj, v_proj"))
    with pytest.raises(leanlora.InjectError, match=r"regex 'q_proj\|v_proj' matches no module"):  # a regex stays one
        leanlora.inject(tiny_llama(), leanlora.AdapterConfig(target_modules="q_proj|v_proj"))


@pytest.mark.parametrize("entry, regex", [("*_proj", r"(.*\.)?[^.]*_proj"), ("re:.*q_proj", ".*q_proj")])
def test_globs_and_re_prefixes_in_a_list_are_refused_with_the_regex_to_use(entry, regex):
    with pytest.raises(leanlora.ConfigError, match=r"entry .* is a pattern.*give one regex string") as info:
        leanlora.AdapterConfig(target_modules=(entry,))
    assert repr(regex) in str(info.value)


def test_matching_agrees_with_peft_on_lists_and_regexes():
    peft = pytest.importorskip("peft")
    for spec in (["q_proj", "mlp.down_proj"], r".*layers\.1\.self_attn\.(q|v)_proj", ["0.self_attn.k_proj"]):
        ours = tiny_llama()
        leanlora.inject(ours, leanlora.AdapterConfig(target_modules=spec if isinstance(spec, str) else tuple(spec), r=2))
        theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=spec))
        peft_names = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                            if isinstance(m, peft.tuners.lora.LoraLayer))
        assert sorted(n for n, _ in leanlora.adapted_layers(ours)) == peft_names, spec


def test_all_linear_matches_peft_and_skips_output_layer_and_classifier():
    peft = pytest.importorskip("peft")
    for factory, task in ((tiny_llama, None), (tiny_bert, "SEQ_CLS")):
        ours = factory()
        leanlora.inject(ours, leanlora.AdapterConfig(target_modules="all-linear", r=2))
        theirs = peft.get_peft_model(factory(), peft.LoraConfig(r=2, target_modules="all-linear", task_type=task))
        peft_names = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                            if isinstance(m, peft.tuners.lora.LoraLayer))
        names = sorted(n for n, _ in leanlora.adapted_layers(ours))
        assert names == peft_names
        assert not any(n.startswith(("lm_head", "classifier")) for n in names)


def test_default_targets_are_the_query_and_value_projections():
    cases = ((tiny_llama, ("q_proj", "v_proj")), (tiny_bert, ("query", "value")), (tiny_gpt2, ("c_attn",)))
    for factory, leaves in cases:
        model = leanlora.get_model(factory(), leanlora.AdapterConfig(r=2))
        names = [n for n, _ in leanlora.adapted_layers(model)]
        assert names and {n.rsplit(".", 1)[-1] for n in names} == set(leaves)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(leanlora.InjectError, match=r"none of the default targets.*'all-linear'"):
        leanlora.inject(plain, leanlora.AdapterConfig(r=2))


def test_cli_and_api_share_the_default_targets():
    from leanlora.train.runconfig import RunConfig

    assert RunConfig().adapter.target_modules is None is leanlora.AdapterConfig().target_modules


def test_get_model_returns_the_adapted_model_like_get_peft_model():
    model = tiny_llama()
    got = leanlora.get_model(model, leanlora.AdapterConfig(target_modules=["q_proj"], r=2))
    assert got is model and len(list(leanlora.adapted_layers(model))) == 2


@pytest.mark.parametrize("kwargs, want", [
    ({"lora_alpha": 32}, {"alpha": 32}),
    ({"lora_dropout": 0.1}, {"dropout": 0.1}),
    ({"lora_alpha": 32, "alpha": 32}, {"alpha": 32}),
    ({"use_rslora": True}, {"rslora": True}),
])
def test_peft_names_lora_alpha_lora_dropout_and_use_rslora(kwargs, want):
    cfg = leanlora.AdapterConfig(**kwargs)
    assert {k: getattr(cfg, k) for k in want} == want
    assert leanlora.AdapterConfig.from_dict(kwargs) == cfg


def test_both_spellings_with_different_values_are_refused():
    with pytest.raises(leanlora.ConfigError, match=r"lora_alpha=32 is invalid: alpha=8 is also given"):
        leanlora.AdapterConfig(alpha=8, lora_alpha=32)
    with pytest.raises(leanlora.ConfigError, match=r"adapter.lora_dropout=0.1 is invalid: adapter.dropout=0.2"):
        leanlora.AdapterConfig.from_dict({"dropout": 0.2, "lora_dropout": 0.1})


def test_peft_loraconfig_keywords_carry_over():
    """The LoraConfig every PEFT tutorial writes, keyword for keyword."""
    from peft import TaskType

    cfg = leanlora.AdapterConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type=TaskType.CAUSAL_LM,
                                 target_modules=["q_proj", "v_proj"])
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.task_type) == (16, 32, 0.05, "CAUSAL_LM")
    assert leanlora.AdapterConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(leanlora.ConfigError, match=r"bias='all' is invalid: only 'none'.*modules_to_save"):
        leanlora.AdapterConfig(bias="all")
    with pytest.raises(leanlora.ConfigError, match=r"task_type='SEQ_CLS_X' is invalid: allowed: \['CAUSAL_LM'"):
        leanlora.AdapterConfig(task_type="SEQ_CLS_X")


def llama_classifier():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=1, num_attention_heads=4,
                                                      num_key_value_heads=2, pad_token_id=0))


@pytest.mark.parametrize("make, head", [(tiny_bert, "classifier"), (llama_classifier, "score")])
def test_task_type_seq_cls_trains_the_head_as_peft_does(make, head, tmp_path):
    model = make()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules="all-linear", r=2, task_type="SEQ_CLS"))
    trainable = [n for n, _ in leanlora.trainable_parameters(model)]
    assert any(n.startswith(head + ".") for n in trainable), trainable
    with torch.no_grad():
        model.get_submodule(head).weight.add_(1.0)  # as training would move it
    leanlora.save(model, tmp_path)
    from safetensors.torch import load_file
    assert any(k.startswith(head + ".") for k in load_file(tmp_path / "leanlora_adapter.safetensors"))
    loaded = leanlora.load(make(), tmp_path)
    assert torch.equal(loaded.get_submodule(head).weight, model.get_submodule(head).weight)


def test_task_type_without_its_head_warns():
    with pytest.warns(UserWarning, match=r"task_type='SEQ_CLS' trains the model's head.*'classifier' or 'score'"):
        leanlora.inject(tiny_llama(), leanlora.AdapterConfig(target_modules=["q_proj"], r=2, task_type="SEQ_CLS"))


def test_filter_fn_can_veto():
    model = tiny_llama()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("q_proj",), r=2),
                    filter_fn=lambda module, name: ".layers.1." in name)
    assert [n for n, _ in leanlora.adapted_layers(model)] == ["model.layers.1.self_attn.q_proj"]


def test_invalid_regex_is_reported():
    with pytest.raises(leanlora.ConfigError, match="target_modules='\\(' is not a valid regular expression"):
        leanlora.AdapterConfig(target_modules="(")


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
    with pytest.raises(leanlora.InjectError, match=r"modules_to_save entry 'clasifier'.*classifier"):
        leanlora.inject(tiny_bert(), leanlora.AdapterConfig(target_modules=("query",), modules_to_save=("clasifier",)))


def test_plain_torch_model_is_supported():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("0", "2"), r=2))
    assert len(list(leanlora.adapted_layers(model))) == 2
    assert model(torch.randn(3, 8)).shape == (3, 4)
