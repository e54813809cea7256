"""Adapter files are verified on load: checksums, base digests, the JSON's keys, finite tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import leanlora
from conftest import randomize_adapters, tiny_bert, tiny_llama, token_batch
from leanlora.artifact.checksum import CHECKSUM_KEY
from leanlora.artifact.io import CONFIG_NAME, WEIGHTS_NAME

FIXTURES = Path(__file__).parent / "fixtures" / "legacy_v1"


def _saved(tmp_path, seed=0, **kw):
    model = tiny_llama(seed)
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("q_proj", "v_proj"), r=4, **kw))
    randomize_adapters(model)
    out = model(token_batch()).logits
    leanlora.save(model, tmp_path / "ad")
    return out, tmp_path / "ad"


def _edit_json(path, fn):
    meta = json.loads((path / CONFIG_NAME).read_text())
    fn(meta)
    (path / CONFIG_NAME).write_text(json.dumps(meta))


def _sequential():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))


# --- files written before checksums still load ------------------------------------------------


@pytest.mark.parametrize("name", ["lora", "blora"])
def test_legacy_adapter_without_checksums_loads_to_the_same_outputs(name):
    expected = load_file(FIXTURES / "expected.safetensors")
    model = _sequential()
    model.load_state_dict(load_file(FIXTURES / "base.safetensors"))
    meta = json.loads((FIXTURES / name / "adapter_config.json").read_text())
    assert "digest" not in meta["modules"]["0"] and "probe" in meta["modules"]["0"]
    leanlora.load(model, FIXTURES / name).eval()  # the outputs were taken in eval mode
    torch.testing.assert_close(model(expected["x"]), expected[name], rtol=0, atol=1e-6)


def test_legacy_adapter_still_refuses_another_base_by_its_probe():
    model = _sequential()  # default init: not the fixture's base
    with pytest.raises(leanlora.BaseMismatchError, match=r"weights of '0' differ"):
        leanlora.load(model, FIXTURES / "lora")


# --- tensor checksum --------------------------------------------------------------------------


def test_bytes_overwritten_in_place_are_detected(tmp_path):
    _, path = _saved(tmp_path)
    f = path / WEIGHTS_NAME
    data = bytearray(f.read_bytes())
    data[-4:] = b"\x7f\x7f\x7f\x7f"  # the last float becomes ~3.4e38, same file length
    f.write_bytes(bytes(data))
    with pytest.raises(leanlora.AdapterLoadError, match=r"do not match the sha256 stored in the file"):
        leanlora.load(tiny_llama(), path)


def test_checksum_is_in_the_safetensors_metadata(tmp_path):
    from safetensors import safe_open

    _, path = _saved(tmp_path)
    with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
        assert len(f.metadata()[CHECKSUM_KEY]) == 64


# --- base digests -----------------------------------------------------------------------------


def _perturbed_base(fn):
    model = tiny_llama()
    with torch.no_grad():
        fn(model)
    return model


def _noise(model):
    g = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if "q_proj" in name:
            p.mul_(1 + 0.15 * torch.randn(p.shape, generator=g))


def _all_but_sampled(model):
    from leanlora.artifact.identity import PROBE_SIZE

    w = model.model.layers[0].self_attn.q_proj.weight.view(-1)
    keep = torch.linspace(0, w.numel() - 1, steps=PROBE_SIZE).round().long()
    fresh = torch.randn(w.shape)
    fresh[keep] = w[keep]
    w.copy_(fresh)


def _non_adapted(model):
    for name, p in model.named_parameters():
        if "q_proj" not in name and "v_proj" not in name:
            p.copy_(torch.randn(p.shape))


def _one_value(model):
    model.model.norm.weight[0] += 1e-3


@pytest.mark.parametrize("change", [_noise, _all_but_sampled, _non_adapted, _one_value],
                         ids=["15pct-noise", "replaced-except-probe-positions", "non-adapted-replaced", "one-norm-value"])
def test_changed_base_is_refused_and_the_override_loads_it(tmp_path, change):
    _, path = _saved(tmp_path)
    model = _perturbed_base(change)
    with pytest.raises(leanlora.BaseMismatchError, match=r"differs from the base the adapter was trained on.*check_base=False"):
        leanlora.load(model, path)
    assert not hasattr(model, "leanlora_shared")
    leanlora.load(model, path, check_base=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_copy_of_the_saved_base_is_accepted(tmp_path, dtype):
    out, path = _saved(tmp_path)
    model = leanlora.load(tiny_llama().to(dtype), path)
    torch.testing.assert_close(model(token_batch()).logits.float(), out, rtol=0.1, atol=0.1)


def test_upcast_of_a_bf16_saved_base_is_accepted_and_an_fp16_copy_is_not(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("q_proj",), r=4))
    leanlora.save(model, tmp_path / "ad")
    leanlora.load(tiny_llama().to(torch.bfloat16).float(), tmp_path / "ad")
    with pytest.raises(leanlora.BaseMismatchError, match=r"dtype float16 here, bfloat16 when the adapter was saved"):
        leanlora.load(tiny_llama().to(torch.float16), tmp_path / "ad")


def test_digests_are_recorded_before_nf4_quantization(tmp_path):
    pytest.importorskip("torchao")
    model = tiny_llama()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("q_proj",), r=4, base="nf4"))
    leanlora.save(model, tmp_path / "ad")
    leanlora.load(tiny_llama(), tmp_path / "ad")  # the plain base it was quantized from
    with pytest.raises(leanlora.BaseMismatchError):
        leanlora.load(_perturbed_base(_noise), tmp_path / "ad")


def test_merged_adapter_records_the_unmerged_base(tmp_path):
    out, _ = _saved(tmp_path)
    model = leanlora.load(tiny_llama(), tmp_path / "ad")
    leanlora.merge(model)
    leanlora.save(model, tmp_path / "again")
    fresh = leanlora.load(tiny_llama(), tmp_path / "again")
    torch.testing.assert_close(fresh(token_batch()).logits, out, rtol=1e-5, atol=1e-5)


# --- tampered adapter_config.json -------------------------------------------------------------

Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["modules"][Q].pop("in_features"), rf"modules\['{Q}'\]\.in_features: missing"),
    (lambda m: m.pop("modules"), r"modules: missing"),
    (lambda m: m["modules"][Q].update(rank="x"), rf"modules\['{Q}'\]\.rank: 'x' is invalid; expected an integer in 1\.\.4"),
    (lambda m: m["modules"][Q].update(rank=99), rf"modules\['{Q}'\]\.rank: 99 is invalid"),
    (lambda m: m["modules"][Q].update(rank=2.0), rf"modules\['{Q}'\]\.rank: 2\.0 is invalid"),
    (lambda m: m["modules"][Q].update(out_features="64"), rf"modules\['{Q}'\]\.out_features: '64' is invalid"),
    (lambda m: m.update(modules=[]), r"modules: expected a mapping, got list"),
    (lambda m: m["modules"].update({Q: None}), rf"modules\['{Q}'\]: expected a mapping"),
    (lambda m: m["modules"][Q]["digest"].update(weight="abc"), rf"modules\['{Q}'\]\.digest\.weight: expected a mapping"),
    (lambda m: m.update(finalized=True), rf"modules\['{Q}'\]\.finalized: missing although the adapter is finalized"),
    (lambda m: m.update(modules_to_save="classifier"), r"modules_to_save: 'classifier' is invalid"),
    (lambda m: m["adapter"].update(r="8"), r"invalid adapter section"),
    (lambda m: m.pop("adapter"), r"adapter: missing"),
])
def test_tampered_config_names_the_key(tmp_path, edit, message):
    _, path = _saved(tmp_path)
    _edit_json(path, edit)
    model = tiny_llama()
    with pytest.raises(leanlora.AdapterLoadError, match=message):
        leanlora.load(model, path)
    assert not hasattr(model, "leanlora_shared")


def test_editing_r_or_the_rank_is_refused_not_silently_rescaled(tmp_path):
    _, path = _saved(tmp_path)
    _edit_json(path, lambda m: m["adapter"].update(r=8))
    with pytest.raises(leanlora.AdapterLoadError, match=r"edited after the adapter was saved"):
        leanlora.load(tiny_llama(), path)


def test_rank_of_the_json_must_match_the_tensors_for_files_without_checksums(tmp_path):
    _, path = _saved(tmp_path)
    f = path / WEIGHTS_NAME
    save_file(load_file(f), f)  # the same tensors, as a file without checksums
    _edit_json(path, lambda m: m["modules"][Q].update(rank=3))
    with pytest.raises(leanlora.AdapterLoadError, match=rf"has shape \(4, 64\), the model expects \(3, 64\) "
                                                       rf"\(the adapter config's modules\['{Q}'\]: rank 3"):
        leanlora.load(tiny_llama(), path)


@pytest.mark.parametrize("value, message", [
    (float("nan"), r"holds NaN"), (float("inf"), r"holds inf"),
    (7, r"is torch.int64; a floating-point tensor was expected"),
    (True, r"is torch.bool; a floating-point tensor was expected"),
])
def test_bad_tensor_values_and_kinds_are_refused_with_the_tensor_name(tmp_path, value, message):
    _, path = _saved(tmp_path)
    f = path / WEIGHTS_NAME
    tensors = load_file(f)
    key = sorted(tensors)[0]
    if isinstance(value, float):
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value
    else:
        tensors[key] = torch.full(tensors[key].shape, value)
    leanlora.artifact.io.atomic_save_tensors(tensors, f, metadata={"format": "leanlora-adapter"})  # a valid checksum
    model = tiny_llama()
    with pytest.raises(leanlora.AdapterLoadError, match=rf"tensor '{key}' {message}"):
        leanlora.load(model, path)
    assert not hasattr(model, "leanlora_shared")


# --- non-finite adapters are never written ----------------------------------------------------


def _nan_model():
    model = tiny_llama()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("q_proj", "v_proj"), r=4))
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.factors.lora_B[0, 0] = float("nan")
    return model


def test_save_and_export_refuse_non_finite_adapters_naming_the_tensor(tmp_path):
    model = _nan_model()
    with pytest.raises(leanlora.AdapterSaveError, match=r"'model\.layers\.1\.self_attn\.v_proj\.factors\.lora_B' holds NaN"):
        leanlora.save(model, tmp_path / "ad")
    with pytest.raises(leanlora.AdapterSaveError, match=r"model\.layers\.1\.self_attn\.v_proj\.lora_[AB]\.weight' of the PEFT adapter holds NaN"):
        leanlora.export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "ad").exists() and not (tmp_path / "peft").exists()


@pytest.mark.parametrize("merge", [leanlora.merge, leanlora.merge_and_unload])
def test_merge_refuses_non_finite_adapters_naming_the_tensor(merge):
    model = _nan_model()
    with pytest.raises(leanlora.MergeError, match=r"'model\.layers\.1\.self_attn\.v_proj\.factors\.lora_B' holds NaN"):
        merge(model)


# --- atomic folders ---------------------------------------------------------------------------


def _crash_after_first_file(monkeypatch):
    import leanlora.artifact.io as io

    def boom(path, data):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(io, "atomic_write_bytes", boom)  # the config is written after the tensors


def test_crash_during_the_first_write_leaves_no_folder(tmp_path, monkeypatch):
    model = tiny_llama()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("q_proj",), r=4))
    _crash_after_first_file(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        leanlora.save(model, tmp_path / "best")
    assert list(tmp_path.iterdir()) == []


def test_crash_while_replacing_keeps_the_old_folder_whole(tmp_path, monkeypatch):
    out, path = _saved(tmp_path)
    model = leanlora.load(tiny_llama(), path)
    randomize_adapters(model, seed=9)
    _crash_after_first_file(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        leanlora.save(model, path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]
    torch.testing.assert_close(leanlora.load(tiny_llama(), path)(token_batch()).logits, out, rtol=0, atol=0)


def test_leftover_temp_folder_of_a_kill_is_cleaned_and_replacing_works(tmp_path):
    out, path = _saved(tmp_path)
    (tmp_path / ".ad.tmp-dead").mkdir()
    (tmp_path / ".ad.tmp-dead" / WEIGHTS_NAME).write_bytes(b"half")
    model = leanlora.load(tiny_llama(), path)
    leanlora.save(model, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]
    assert sorted(p.name for p in path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])


def test_saving_into_a_folder_with_other_files_keeps_them(tmp_path):
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "tokenizer.json").write_text("{}")
    model = tiny_bert()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("query",), r=2))
    leanlora.save(model, tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, "tokenizer.json"])


def test_a_file_in_the_way_of_the_folder_is_named(tmp_path):
    """save/export under a path whose parent is a file: the error names that file, and nothing is written."""
    (tmp_path / "notes.txt").write_text("mine")
    model = tiny_bert()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("query",), r=2))
    for write in (lambda p: leanlora.save(model, p), lambda p: leanlora.export(model, p, "peft")):
        with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'notes.txt'} is a file, not a folder"):
            write(tmp_path / "notes.txt" / "deeper" / "ad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"
