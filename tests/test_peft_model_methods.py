"""PEFT's model methods on an adapted model: ``save_pretrained`` warns that it is not PEFT's adapter
save, still writes what a plain Trainer resumes from, and is transformers' own again after unload;
``print_trainable_parameters`` prints PEFT's line."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import leanlora
from leanlora.artifact.peft_methods import WholeModelSave


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2))


def adapted() -> LlamaForCausalLM:
    model = leanlora.get_model(tiny_llama(), leanlora.AdapterConfig(target_modules=["q_proj", "v_proj"], r=4))
    with torch.no_grad():  # a nonzero update, so a reload that dropped it would show
        for _, layer in leanlora.adapted_layers(model):
            layer.factors.lora_B.normal_()
    return model


def test_warns_once_and_still_writes_the_state_a_trainer_resumes_from(tmp_path):
    model = adapted()
    with pytest.warns(UserWarning, match=r"not PEFT's adapter save.*leanlora\.save\(model, dir\)"):
        model.save_pretrained(tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path / "b")  # once per model
    saved = load_file(tmp_path / "b" / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.base.layer.weight" in saved
    fresh = adapted()
    with torch.no_grad():
        for _, layer in leanlora.adapted_layers(fresh):
            layer.factors.lora_B.zero_()
    fresh.load_state_dict(saved)
    ids = torch.arange(8)[None]
    assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_unload_gives_back_transformers_own_save(tmp_path):
    model = adapted()
    before = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    plain = leanlora.unload(model)
    assert "save_pretrained" not in plain.__dict__
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        plain.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(saved[key], before[key])


def test_a_copy_saves_itself():
    model = adapted()
    twin = copy.deepcopy(model)
    assert isinstance(twin.save_pretrained, WholeModelSave)
    assert twin.save_pretrained.model is twin


def test_a_plain_torch_model_gets_nothing():
    model = leanlora.inject(nn.Sequential(nn.Linear(8, 8)), leanlora.AdapterConfig(target_modules=["0"], r=2))
    assert not hasattr(model, "save_pretrained")


@pytest.mark.parametrize("base", ["dense", "nf4", "fp8"])
def test_print_trainable_parameters_counts_as_peft_does(base, capsys):
    """PEFT's line and numbers for the same LoRA; a quantized base weight counts at its dense size."""
    peft = pytest.importorskip("peft")
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    from conftest import tiny_llama as llama  # 64 wide: whole NF4 blocks

    theirs = peft.get_peft_model(llama(), peft.LoraConfig(**cfg))
    theirs.print_trainable_parameters()
    want = capsys.readouterr().out
    model = leanlora.get_model(llama(), leanlora.AdapterConfig.from_peft(peft.LoraConfig(**cfg), base=base))
    model.print_trainable_parameters()
    assert capsys.readouterr().out == want
    plain = leanlora.unload(model) if base == "dense" else None
    assert plain is None or not hasattr(plain, "print_trainable_parameters")


def test_merge_and_unload_and_unload_as_methods():
    """``model = model.merge_and_unload()`` and ``model.unload()``, PEFT's last lines of a fine-tune."""
    model = adapted()
    ids = torch.arange(8)[None]
    want = model(input_ids=ids).logits
    with pytest.raises(ValueError, match="holds one adapter"):
        model.merge_and_unload(adapter_names=["default"])
    plain = model.merge_and_unload(progressbar=True, safe_merge=True)
    assert plain is model and not list(leanlora.adapted_layers(plain))
    assert not any(k in plain.__dict__ for k in ("merge_and_unload", "unload", "print_trainable_parameters"))
    torch.testing.assert_close(plain(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    base = tiny_llama()
    unloaded = adapted().unload()
    for (n, p), (m, q) in zip(unloaded.state_dict().items(), base.state_dict().items()):
        assert n == m and torch.equal(p, q), n
