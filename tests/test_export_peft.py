"""PEFT is the oracle: same A and B give the same outputs, and our export loads in PEFT."""

from __future__ import annotations

import json

import pytest
import torch

import leanlora
from leanlora.groups.rows import row_grad
from conftest import minilm_dir, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, token_batch

peft = pytest.importorskip("peft")

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_lora(model, targets, r, alpha, **kw):
    return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                      lora_dropout=0.0, **kw))


def _copy_into_peft(ours, theirs):
    """Copy our A and B into PEFT's lora_A / lora_B of the same module."""
    with torch.no_grad():
        for name, layer in leanlora.adapted_layers(ours):
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.factors.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.factors.lora_B)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_forward_matches_peft(rslora):
    ours = tiny_llama()
    leanlora.inject(ours, leanlora.AdapterConfig(target_modules=tuple(LLAMA_ALL), r=4, alpha=8, rslora=rslora))
    randomize_adapters(ours)
    theirs = _peft_lora(tiny_llama(), LLAMA_ALL, 4, 8, use_rslora=rslora)
    _copy_into_peft(ours, theirs)
    x = token_batch()
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=1e-5, atol=1e-5)


def test_a_peft_loraconfig_converts_to_the_same_lora():
    """AdapterConfig.from_peft: the LoraConfig a PEFT user already has gives the adapter PEFT builds
    from it (same modules, parameters and outputs, rslora scale included)."""
    cfg = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, use_rslora=True, bias="none", task_type="CAUSAL_LM",
                          target_modules=["q_proj", "v_proj", "down_proj"],
                          exclude_modules=["model.layers.1.mlp.down_proj"])
    ours = leanlora.inject(tiny_llama(), leanlora.AdapterConfig.from_peft(cfg))
    randomize_adapters(ours)
    theirs = peft.get_peft_model(tiny_llama(), cfg)
    _copy_into_peft(ours, theirs)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == theirs.get_nb_trainable_parameters()[0]
    x = token_batch()
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(leanlora.ConfigError, match=r"sets \['use_dora'\], which leanlora has no counterpart"):
        leanlora.AdapterConfig.from_peft(peft.LoraConfig(use_dora=True))
    with pytest.raises(TypeError, match=r"got LoraConfig; convert PEFT's with leanlora.AdapterConfig.from_peft"):
        leanlora.inject(tiny_llama(), cfg)


def test_trainable_parameter_count_matches_peft():
    ours = tiny_llama()
    leanlora.inject(ours, leanlora.AdapterConfig(target_modules=tuple(LLAMA_ALL), r=8))
    theirs = _peft_lora(tiny_llama(), LLAMA_ALL, 8, 16)
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    n_theirs, _ = theirs.get_nb_trainable_parameters()
    assert n_ours == n_theirs


def test_gradients_match_peft():
    ours = tiny_llama()
    leanlora.inject(ours, leanlora.AdapterConfig(target_modules=("q_proj", "v_proj"), r=4, alpha=8))
    randomize_adapters(ours)
    theirs = _peft_lora(tiny_llama(), ["q_proj", "v_proj"], 4, 8)
    _copy_into_peft(ours, theirs)
    x = token_batch()
    ours(x, labels=x).loss.backward()
    theirs(x, labels=x).loss.backward()
    for name, layer in leanlora.adapted_layers(ours):
        peft_layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(row_grad(layer.factors, "lora_A"), peft_layer.lora_A["default"].weight.grad,
                                   rtol=1e-4, atol=1e-6)


def _export_and_reload(model, factory, tmp_path):
    leanlora.export_peft(model, tmp_path / "peft")
    return peft.PeftModel.from_pretrained(factory(), tmp_path / "peft")


def test_export_loads_in_peft_with_per_module_ranks(tmp_path):
    model = tiny_llama()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=tuple(LLAMA_ALL), r=6, alpha=12))
    randomize_adapters(model)
    # give modules different ranks, as finalize / set_rank do
    for i, (_, layer) in enumerate(leanlora.adapted_layers(model)):
        layer.prune_(1 + i % 6)
    x = token_batch()
    out = model(x).logits
    loaded = _export_and_reload(model, tiny_llama, tmp_path)
    torch.testing.assert_close(loaded(x).logits, out, rtol=1e-5, atol=1e-5)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert sorted(set(cfg["rank_pattern"].values())) == [1, 2, 3, 4, 5, 6]
    assert cfg["peft_type"] == "LORA" and cfg["alpha_pattern"]


@pytest.mark.parametrize("head", [dict(modules_to_save=("classifier",)), dict(task_type="SEQ_CLS")])
def test_export_with_classifier_head(tmp_path, head):
    model = tiny_bert()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("query", "value"), r=4, **head))
    randomize_adapters(model)
    with torch.no_grad():
        model.classifier.weight.mul_(3.0)
    x = token_batch()
    out = model(x).logits
    loaded = _export_and_reload(model, tiny_bert, tmp_path)
    torch.testing.assert_close(loaded(x).logits, out, rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["task_type"] == head.get("task_type")
    if "task_type" in head:  # PEFT's class for the task
        assert isinstance(loaded, peft.PeftModelForSequenceClassification)


def test_export_gpt2_conv1d(tmp_path):
    model = tiny_gpt2()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("c_attn",), r=4))
    randomize_adapters(model)
    x = token_batch()
    out = model(x).logits
    loaded = _export_and_reload(model, tiny_gpt2, tmp_path)
    torch.testing.assert_close(loaded(x).logits, out, rtol=1e-5, atol=1e-5)


def test_real_minilm_export_matches_peft(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_dir()

    def load_model():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()

    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(["a gripping, funny film", "dull and far too long"], return_tensors="pt", padding=True)
    model = load_model()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("query", "key", "value", "dense"), r=8,
                                                  modules_to_save=("classifier",)))
    randomize_adapters(model, std=0.02)
    out = model(**batch).logits
    with leanlora.disable_adapters(model):
        base_out = model(**batch).logits
    torch.testing.assert_close(base_out, load_model()(**batch).logits, rtol=0, atol=0)
    loaded = _export_and_reload(model, load_model, tmp_path)
    torch.testing.assert_close(loaded(**batch).logits, out, rtol=1e-5, atol=1e-5)
