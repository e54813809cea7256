"""Every export format against an oracle: PEFT for ``peft`` and ``peft-uniform``, transformers'
from_pretrained for ``merged``, and for ``peft-uniform`` also a reader written here that applies
A and B from the safetensors file by hand, the way a runtime that ignores patterns would."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import leanlora
from conftest import randomize_adapters, randomize_gates, tiny_bert, tiny_llama, token_batch
from leanlora.artifact.export import ExportError

peft = pytest.importorskip("peft")

TARGETS = ("q_proj", "v_proj", "down_proj")


def _adapted(kind: str, base=None):
    """A tiny Llama with an adapter of ``kind`` in the state a user exports: varied ranks and scales."""
    model = base if base is not None else tiny_llama()
    bank = leanlora.BankConfig(num_vectors=16, vector_length=16, topk=2)
    config = {
        "dense": dict(r=4, alpha=8),
        "gated": dict(r=6, alpha=12, ranks="gated"),
        "learned_bits": dict(r=6, alpha=12, ranks="gated", precision="learned"),
        "bank": dict(r=4, factors="bank", bank=bank),
        "nested": dict(r=6, alpha=6, ranks="nested"),
        "nf4": dict(r=4, alpha=8, base="nf4"),
    }[kind]
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=TARGETS, **config))
    randomize_adapters(model, seed=1)
    if kind == "dense":
        for i, (_, layer) in enumerate(leanlora.adapted_layers(model)):
            layer.prune_(1 + i % 4)     # per-module ranks: alpha/r differs per module
    elif kind in ("gated", "learned_bits"):
        randomize_gates(model, seed=2)
        leanlora.finalize(model)
    elif kind == "bank":
        with torch.no_grad():
            model.leanlora_shared.bank.vectors.uniform_(-0.5, 0.5)
    elif kind == "nested":
        leanlora.set_rank(model, 3)     # the rank chosen by a sweep
    return model.eval()


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def assert_close_relative(got, want, rel=1e-5):
    """max |got - want| within ``rel`` of the largest logit."""
    err = (got - want).abs().max().item()
    assert err <= rel * want.abs().max().item(), f"max abs difference {err:.3g} vs max |logit| {want.abs().max():.3g}"


KINDS = ["dense", "gated", "learned_bits", "bank", "nested"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", ["peft", "peft-uniform"])
def test_peft_formats_load_in_peft_with_the_same_logits(kind, fmt, tmp_path):
    model = _adapted(kind)
    x = token_batch()
    want = _logits(model, x)
    leanlora.export(model, tmp_path / "out", format=fmt)
    served = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "out").eval()
    assert_close_relative(_logits(served, x), want)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    if fmt == "peft-uniform":
        assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
        assert config["lora_alpha"] == config["r"] and config["modules_to_save"] is None


def _apply_by_hand(base, folder, one_rank=True):
    """W += (lora_alpha / rank of the tensor) · B A for every pair in the file, on a plain model:
    patterns ignored and alpha divided by each tensor's own rank, as llama.cpp's converter does."""
    config = json.loads((folder / "adapter_config.json").read_text())
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f, torch.no_grad():
        keys = sorted(f.keys())
        assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
        for key in (k for k in keys if k.endswith(".lora_A.weight")):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a, b = f.get_tensor(key), f.get_tensor(key.replace(".lora_A.", ".lora_B."))
            assert not one_rank or a.shape[0] == b.shape[1] == config["r"]     # one rank for every module
            base.get_submodule(name).weight += (config["lora_alpha"] / a.shape[0]) * (b @ a)
    return base


@pytest.mark.parametrize("kind", KINDS)
def test_uniform_file_applied_by_hand_gives_the_same_logits(kind, tmp_path):
    model = _adapted(kind)
    x = token_batch()
    want = _logits(model, x)
    leanlora.export(model, tmp_path / "out", format="peft-uniform")
    assert_close_relative(_logits(_apply_by_hand(tiny_llama(), tmp_path / "out"), x), want)


def test_the_hand_reader_gets_the_patterned_format_wrong(tmp_path):
    """The reason for peft-uniform: read without its patterns, the per-module-rank file is off."""
    model = _adapted("dense")
    x = token_batch()
    want = _logits(model, x)
    leanlora.export(model, tmp_path / "out", format="peft")
    got = _logits(_apply_by_hand(tiny_llama(), tmp_path / "out", one_rank=False), x)
    assert (got - want).abs().max() > 1e-3 * want.abs().max()


@pytest.mark.parametrize("kind", KINDS + ["nf4"])
def test_merged_loads_with_from_pretrained_and_matches(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _adapted(kind)
    x = token_batch()
    want = _logits(model, x)
    leanlora.export(model, tmp_path / "merged", format="merged")
    assert list(leanlora.adapted_layers(model)) and hasattr(model, "leanlora_shared")  # a copy was merged
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    assert_close_relative(_logits(merged, x), want)
    if kind != "nf4":  # PEFT's own merge of the PEFT export agrees (an NF4 base is not PEFT's base)
        leanlora.export(model, tmp_path / "peft", format="peft")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").merge_and_unload()
        assert_close_relative(_logits(merged, x), _logits(theirs, x))


def test_uniform_refuses_modules_to_save_and_names_them(tmp_path):
    model = tiny_bert()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("query", "value"), r=4,
                                                  modules_to_save=("classifier",)))
    with pytest.raises(ExportError, match=r"modules_to_save \['classifier'\].*--format merged"):
        leanlora.export(model, tmp_path / "out", format="peft-uniform")
    assert not (tmp_path / "out").exists()


def test_uniform_with_modules_to_save_when_asked_loads_in_peft(tmp_path):
    model = tiny_bert()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("query", "value"), r=4,
                                                  modules_to_save=("classifier",)))
    randomize_adapters(model)
    layers = dict(leanlora.adapted_layers(model))
    layers["bert.encoder.layer.0.attention.self.query"].prune_(2)
    with torch.no_grad():
        model.classifier.weight.mul_(3.0)
    x = token_batch()
    want = _logits(model, x)
    leanlora.export(model, tmp_path / "out", format="peft-uniform", modules_to_save=True)
    served = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "out").eval()
    assert_close_relative(_logits(served, x), want)


def _tiny_gguf(path, model):
    """Write ``model`` (a tiny Llama) as an F32 GGUF file that transformers loads."""
    gguf = pytest.importorskip("gguf")
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    top = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
    block = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        name = top.get(key) or f"blk.{parts[2]}.{block['.'.join(parts[3:-1])]}"
        writer.add_tensor(f"{name}.weight", value.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_merged_from_a_gguf_loaded_model(tmp_path):
    from transformers import AutoModelForCausalLM

    _tiny_gguf(tmp_path / "tiny.gguf", tiny_llama())

    def from_gguf():
        return AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", local_files_only=True).eval()

    model = _adapted("dense", base=from_gguf())
    x = token_batch()
    want = _logits(model, x)
    leanlora.export(model, tmp_path / "merged", format="merged", in_place=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    assert getattr(merged.config, "quantization_config", None) is None
    assert_close_relative(_logits(merged, x), want)


def test_unknown_format_is_refused(tmp_path):
    model = _adapted("dense")
    with pytest.raises(ExportError, match=r"format='gguf' is invalid: allowed \['peft', 'peft-uniform', 'merged'\]"):
        leanlora.export(model, tmp_path / "out", format="gguf")
