"""Save / load round trips and every load failure, which must leave the model unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import leanlora
from conftest import randomize_adapters, tiny_bert, tiny_llama, token_batch


def _saved(tmp_path, **kw):
    model = tiny_llama()
    cfg = leanlora.AdapterConfig(target_modules=("q_proj", "v_proj", "down_proj"), r=4, **kw)
    leanlora.inject(model, cfg)
    randomize_adapters(model)
    out = model(token_batch()).logits
    leanlora.save(model, tmp_path / "ad")
    return model, out, tmp_path / "ad"


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    assert not hasattr(model, "leanlora_shared")
    assert not any(isinstance(m, leanlora.AdaptedLinear) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_round_trip_gives_same_outputs_and_files_are_safetensors(tmp_path):
    _, out, path = _saved(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["leanlora_adapter.safetensors", "leanlora_config.json"]
    meta = json.loads((path / "leanlora_config.json").read_text())
    assert meta["version"] == 1 and meta["base_model"]["architecture"] == "LlamaForCausalLM"
    fresh = leanlora.load(tiny_llama(), path)
    torch.testing.assert_close(fresh(token_batch()).logits, out, rtol=0, atol=0)
    assert not any(p.requires_grad for p in fresh.parameters())


def test_round_trip_with_modules_to_save(tmp_path):
    model = tiny_bert()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("query",), modules_to_save=("classifier",)))
    randomize_adapters(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    x = torch.randint(0, 128, (2, 9))
    out = model(x).logits
    leanlora.save(model, tmp_path / "ad")
    fresh = leanlora.load(tiny_bert(), tmp_path / "ad", trainable=True)
    torch.testing.assert_close(fresh(x).logits, out, rtol=0, atol=0)
    assert fresh.classifier.weight.requires_grad


def test_load_onto_other_checkpoint_is_refused(tmp_path):
    _, _, path = _saved(tmp_path)
    other = tiny_llama(seed=5)
    before = _state(other)
    with pytest.raises(leanlora.AdapterLoadError, match=r"differs from the base the adapter was trained on"):
        leanlora.load(other, path)
    _assert_unchanged(other, before)
    leanlora.load(other, path, check_base=False)  # the override works


def test_load_onto_bf16_copy_of_same_base_is_accepted(tmp_path):
    _, out, path = _saved(tmp_path)
    model = leanlora.load(tiny_llama().to(torch.bfloat16), path)
    torch.testing.assert_close(model(token_batch()).logits.float(), out, rtol=0.1, atol=0.1)


def test_load_onto_other_architecture_is_refused(tmp_path):
    _, _, path = _saved(tmp_path)
    with pytest.raises(leanlora.AdapterLoadError, match=r"trained on a LlamaForCausalLM, this model is a BertForSequenceClassification"):
        leanlora.load(tiny_bert(), path)


def test_shape_mismatch_is_named(tmp_path):
    _, _, path = _saved(tmp_path)
    other = tiny_llama(hidden_size=32, intermediate_size=64)
    with pytest.raises(leanlora.AdapterLoadError, match=r"q_proj' is 32->32 here but 64->64"):
        leanlora.load(other, path)


def test_truncated_tensor_file(tmp_path):
    _, _, path = _saved(tmp_path)
    data = (path / "leanlora_adapter.safetensors").read_bytes()
    (path / "leanlora_adapter.safetensors").write_bytes(data[: len(data) // 2])
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(leanlora.AdapterLoadError, match=r"leanlora_adapter.safetensors: cannot be read.*truncated or corrupted"):
        leanlora.load(model, path)
    _assert_unchanged(model, before)


def test_corrupted_config(tmp_path):
    _, _, path = _saved(tmp_path)
    (path / "leanlora_config.json").write_text('{"format": "leanlora-adapter", "vers')
    with pytest.raises(leanlora.AdapterLoadError, match=r"leanlora_config.json: not valid JSON"):
        leanlora.load(tiny_llama(), path)


def test_unknown_format_version(tmp_path):
    _, _, path = _saved(tmp_path)
    meta = json.loads((path / "leanlora_config.json").read_text())
    meta["version"] = 99
    (path / "leanlora_config.json").write_text(json.dumps(meta))
    with pytest.raises(leanlora.AdapterLoadError, match=r"format version 99 is not supported"):
        leanlora.load(tiny_llama(), path)


def test_missing_tensor_leaves_model_unchanged(tmp_path):
    _, _, path = _saved(tmp_path)
    tensors = load_file(path / "leanlora_adapter.safetensors")
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, path / "leanlora_adapter.safetensors")
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(leanlora.AdapterLoadError, match=rf"missing tensor\(s\) \['{dropped}'\]"):
        leanlora.load(model, path)
    _assert_unchanged(model, before)


def test_tensor_shape_mismatch_leaves_model_unchanged(tmp_path):
    _, _, path = _saved(tmp_path)
    tensors = load_file(path / "leanlora_adapter.safetensors")
    key = "model.layers.0.self_attn.q_proj.factors.lora_A"
    tensors[key] = torch.zeros(3, 64)
    save_file(tensors, path / "leanlora_adapter.safetensors")
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(leanlora.AdapterLoadError, match=rf"tensor '{key}' has shape \(3, 64\), the model expects \(4, 64\)"):
        leanlora.load(model, path)
    _assert_unchanged(model, before)


def test_missing_folder(tmp_path):
    with pytest.raises(leanlora.AdapterLoadError, match="leanlora_config.json: not found"):
        leanlora.load(tiny_llama(), tmp_path / "nowhere")


def test_save_is_atomic_no_temp_files_left(tmp_path):
    _, _, path = _saved(tmp_path)
    leanlora.save(leanlora.load(tiny_llama(), path), path)  # overwrite in place
    assert sorted(p.name for p in path.iterdir()) == ["leanlora_adapter.safetensors", "leanlora_config.json"]
