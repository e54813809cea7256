"""VB-LoRA factors: composition, scale, shared bank, top-k-only storage, PEFT parity."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama, token_batch
from safetensors.torch import load_file, save_file

import leanlora
from leanlora.factors.bank import BankFactors, VectorBank, composition_cost, compose
from leanlora.factors.bank_storage import (
    float32_equivalents,
    index_dtype,
    topk_stored_bytes,
    topk_bytes,
    unpack_topk,
)

ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
H, B, R, K = 16, 16, 4, 2   # tiny llama dims 64 / 32 (k,v) / 128 are multiples of b=16


def bank_config(**kw) -> leanlora.AdapterConfig:
    bank = dict(num_vectors=H, vector_length=B, topk=K, logits_init_std=0.1)
    bank.update(kw.pop("bank", {}))
    return leanlora.AdapterConfig(target_modules=kw.pop("target_modules", ALL_PROJ), r=kw.pop("r", R),
                                  factors="bank", bank=leanlora.BankConfig(**bank), **kw)


def bank_model(seed: int = 0, **kw):
    model = leanlora.inject(tiny_llama(seed), bank_config(**kw))
    torch.manual_seed(seed + 100)   # the bank starts tiny (U(-0.02, 0.02)); widen it so updates show
    with torch.no_grad():
        model.leanlora_shared.bank.vectors.uniform_(-0.5, 0.5)
    return model


def out(model, x=None):
    with torch.no_grad():
        return model(token_batch() if x is None else x).logits


# --- composition ------------------------------------------------------------------------------


def test_compose_equals_masked_softmax_mixture():
    g = torch.Generator().manual_seed(0)
    logits, bank = torch.randn(3, 5, 7, generator=g), torch.randn(7, 4, generator=g)
    for k in (1, 2, 3, 7):
        kth = logits.topk(k, dim=-1).values[..., -1:]
        masked = logits.masked_fill(logits < kth, float("-inf"))      # METHODS.md §2.1: others -inf
        want = masked.softmax(-1) @ bank                                # (3, 5, 4)
        torch.testing.assert_close(compose(logits, bank, k), want, rtol=1e-6, atol=1e-7)


def test_init_distributions_and_shapes():
    bank = VectorBank(256, 32, init_range=0.02)
    assert bank.vectors.shape == (256, 32) and bank.vectors.abs().max() <= 0.02
    assert 0.0115 - 0.001 < bank.vectors.std() < 0.0115 + 0.001   # U(-a, a) has std a/sqrt(3)
    f = BankFactors(bank, 64, 128, rank=8, topk=2, logits_init_std=0.01)
    assert f.logits.shape == (8, (64 + 128) // 32, 256) and f.num_subvectors == 8 * 6
    assert abs(float(f.logits.detach().std()) - 0.01) < 0.001 and abs(float(f.logits.detach().mean())) < 0.001
    a, b = f()
    assert a.shape == (8, 64) and b.shape == (128, 8)
    assert list(f.children()) == [] and [n for n, _ in f.named_parameters()] == ["logits"]


def test_gradients_reach_bank_and_only_topk_logits():
    bank = VectorBank(8, 4)
    f = BankFactors(bank, 8, 12, rank=2, topk=2, logits_init_std=1.0)
    a, b = f()
    (b @ a).square().sum().backward()
    assert bank.vectors.grad.abs().sum() > 0
    nonzero = (f.logits.grad != 0).sum(-1)
    assert int(nonzero.max()) <= 2 and int(nonzero.min()) >= 1


def test_composition_is_one_graph_under_torch_compile():
    model = bank_model()
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 64)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")   # fullgraph: a break raises
    torch.testing.assert_close(compiled(x), layer(x))


def test_composition_cost_counts_llama7b_q_proj():
    cost = composition_cost(rank=4, in_features=4096, out_features=4096, vector_length=256,
                            num_vectors=2048, topk=2)
    assert cost == {"topk_logits": 4 * 32 * 2048, "macs": 4 * 32 * 2 * 256}
    assert cost["macs"] * 256 == 4096 * 4096   # 1/256 of one token's base matmul


# --- scale, shapes, errors -------------------------------------------------------------------


def test_unscaled_update_is_plain_BA_and_scaled_uses_alpha_over_r():
    for scaled, want_scale in ((False, 1.0), (True, 16.0 / R)):
        model = bank_model(alpha=16.0, bank={"scaled": scaled})
        layer = model.model.layers[1].mlp.down_proj
        a, b = layer.factors()
        torch.testing.assert_close(layer.delta_weight(), want_scale * (b @ a))
        assert model.leanlora_shared.config.scaling == want_scale


def test_rslora_without_scaled_bank_is_rejected():
    with pytest.raises(leanlora.ConfigError, match="rslora.*bank.scaled"):
        bank_config(rslora=True)
    bank_config(rslora=True, bank={"scaled": True})


def test_vector_length_that_does_not_divide_names_module_dimension_and_divisors():
    with pytest.raises(leanlora.ConfigError) as err:
        leanlora.inject(tiny_llama(), bank_config(target_modules=("k_proj",), bank={"vector_length": 24}))
    msg = str(err.value)
    assert "bank.vector_length=24" in msg and "model.layers.0.self_attn.k_proj" in msg
    assert "in_features=64" in msg and "[1, 2, 4, 8, 16, 32]" in msg
    with pytest.raises(ValueError, match="does not divide out_features=30 of module 'x'"):
        BankFactors(VectorBank(4, 4), 12, 30, rank=2, topk=2, name="x")


def test_bank_is_registered_once_and_param_groups_use_bank_and_logits_lrs():
    model = bank_model(bank={"bank_lr": 2e-3, "logits_lr": 3e-2})
    bank_names = [n for n, p in model.named_parameters() if p.shape == (H, B)]
    assert bank_names == ["leanlora_shared.bank.vectors"]
    assert [k for k in model.state_dict() if k.endswith("bank.vectors")] == bank_names
    groups = {g["role"]: g for g in leanlora.param_groups(model, lr=1e-4, weight_decay=0.1)}
    assert set(groups) == {"bank", "logits"}
    assert len(groups["bank"]["params"]) == 1 and groups["bank"]["params"][0] is model.leanlora_shared.bank.vectors
    assert groups["bank"]["lr"] == 2e-3 and groups["logits"]["lr"] == 3e-2
    assert groups["bank"]["weight_decay"] == 0.0 and groups["logits"]["weight_decay"] == 0.0
    # one stacked logits tensor per group of layers, a row for each of the 2 x 7 adapted layers
    assert len(groups["logits"]["params"]) == len(model.leanlora_shared.groups)
    assert sum(p.shape[0] for p in groups["logits"]["params"]) == 2 * len(ALL_PROJ)


def test_deepcopy_layers_follow_the_copied_bank():
    import copy

    model = bank_model()
    twin = copy.deepcopy(model)
    layer = twin.model.layers[1].self_attn.v_proj
    assert layer.factors.bank is twin.leanlora_shared.bank and layer.factors.bank is not model.leanlora_shared.bank
    assert torch.equal(out(twin), out(model))


def test_prune_keeps_leading_components():
    model = bank_model()
    layer = model.model.layers[0].mlp.up_proj
    a, b = layer.factors()
    want = b[:, :2] @ a[:2]
    layer.prune_(2)
    assert layer.factors.logits.shape[0] == 2 and layer.factors.rank == 2
    torch.testing.assert_close(layer.delta_weight(), want)


# --- storage ---------------------------------------------------------------------------------


def test_index_dtype_thresholds():
    assert index_dtype(255) == torch.uint8 and index_dtype(256) == torch.int16
    assert index_dtype(2**15 - 1) == torch.int16 and index_dtype(2**15) == torch.int32


def test_default_save_keeps_logits_and_reloads_exactly(tmp_path):
    model = bank_model()
    leanlora.save(model, tmp_path)
    assert json.loads((tmp_path / "leanlora_config.json").read_text())["bank_storage"] == "logits"
    loaded = leanlora.load(tiny_llama(), tmp_path)
    assert torch.equal(out(loaded), out(model))


def test_topk_only_save_reloads_same_outputs_and_stores_the_formula_bytes(tmp_path):
    model = bank_model()
    leanlora.save(model, tmp_path, topk_only=True)
    assert json.loads((tmp_path / "leanlora_config.json").read_text())["bank_storage"] == "topk"
    stored = load_file(tmp_path / "leanlora_adapter.safetensors")
    assert not any(k.endswith(".logits") for k in stored)
    idx = stored["model.layers.0.self_attn.q_proj.factors.topk_indices"]
    w = stored["model.layers.0.self_attn.q_proj.factors.topk_weights"]
    assert idx.dtype == torch.uint8 and idx.shape == (R, (64 + 64) // B, K) and w.shape == (R, 8, K - 1)

    n_sub = sum(R * (i + o) // B for i, o in [(64, 64), (64, 32), (64, 32), (64, 64),
                                               (64, 128), (64, 128), (128, 64)]) * 2   # 2 layers
    payload = sum(t.numel() * t.element_size() for t in stored.values())
    assert payload == topk_stored_bytes(model) == topk_bytes(H, B, n_sub, K)
    assert payload == 4 * float32_equivalents(H, B, n_sub, K) == 4 * (H * B + n_sub * (K - 1) + n_sub * K * 0.25)

    loaded = leanlora.load(tiny_llama(), tmp_path)
    torch.testing.assert_close(out(loaded), out(model), rtol=1e-5, atol=1e-6)


def test_paper_byte_formula_for_square_modules():
    # METHODS.md §2.3, k = 2 and uint8: h·b + 3·L·M·r·(d/b) float32 equivalents.
    model = bank_model(target_modules=("q_proj", "o_proj"))   # M = 2 square 64x64 modules, L = 2
    assert topk_stored_bytes(model) == 4 * (H * B + 3 * 2 * 2 * R * (64 // B))


def test_topk_only_adapter_frozen_refuses_training_and_trainable_reload_trains(tmp_path):
    model = bank_model()
    leanlora.save(model, tmp_path, topk_only=True)
    frozen = leanlora.load(tiny_llama(), tmp_path)
    layer = frozen.model.layers[0].self_attn.q_proj
    assert torch.isinf(layer.factors.logits).any()
    before = out(frozen)
    leanlora.merge(frozen)                       # inference uses work: merge (and export) the -inf layout
    torch.testing.assert_close(out(frozen), before, rtol=1e-5, atol=1e-5)
    leanlora.unmerge(frozen)
    frozen.train()
    out(frozen)                                  # frozen logits: a train-mode forward is harmless
    layer.group.factors.logits.requires_grad_(True)  # the stack the layer's logits are a row of
    with pytest.raises(RuntimeError, match="top-k-only.*trainable=True"):
        frozen(token_batch())

    resumed = leanlora.load(tiny_llama(), tmp_path, trainable=True)
    assert all(torch.isfinite(f.logits).all() for f in (m.factors for _, m in leanlora.adapted_layers(resumed)))
    torch.testing.assert_close(out(resumed), out(model), rtol=1e-5, atol=1e-6)
    resumed.train()
    opt = torch.optim.AdamW(leanlora.param_groups(resumed, lr=1e-3))
    x = token_batch()
    loss = resumed(x, labels=x).loss
    loss.backward()
    opt.step()
    after = out(resumed.eval())
    assert torch.isfinite(after).all() and not torch.allclose(after, out(model))


def test_unpack_floor_keeps_topk_and_weights():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 9, generator=g)
    vals, idx = logits.topk(3, -1)
    w = vals.softmax(-1)
    for gap in (None, 1.0):
        rebuilt = unpack_topk(idx.to(torch.uint8), w[..., :-1], 9, gap)
        v2, i2 = rebuilt.topk(3, -1)
        assert torch.equal(i2, idx)
        torch.testing.assert_close(v2.softmax(-1), w)


@pytest.mark.parametrize("damage", ["drop_weights", "wrong_k", "bad_index", "drop_indices_dtype"])
def test_topk_only_load_is_strict_and_leaves_model_untouched(tmp_path, damage):
    model = bank_model()
    leanlora.save(model, tmp_path, topk_only=True)
    path = tmp_path / "leanlora_adapter.safetensors"
    tensors = load_file(path)
    key = "model.layers.1.mlp.gate_proj.factors.topk_"
    if damage == "drop_weights":
        del tensors[key + "weights"]
        match = "missing tensor.*gate_proj.factors.topk_weights"
    elif damage == "wrong_k":
        tensors[key + "indices"] = tensors[key + "indices"][..., :1].contiguous()
        match = "gate_proj.factors.topk_indices.*do not form a top-2 layout"
    elif damage == "bad_index":
        tensors[key + "indices"][0, 0, 0] = H
        match = f"holds index {H}, outside the bank of h={H}"
    else:
        tensors[key + "indices"] = tensors[key + "indices"].to(torch.int32)
        match = "gate_proj.factors.topk_indices.*torch.int32, expected torch.uint8"
    save_file(tensors, path)
    fresh = tiny_llama()
    with pytest.raises(leanlora.AdapterLoadError, match=match):
        leanlora.load(fresh, tmp_path)
    assert not hasattr(fresh, "leanlora_shared") and not list(leanlora.adapted_layers(fresh))


def test_topk_only_needs_a_bank_adapter(tmp_path):
    model = leanlora.inject(tiny_llama(), leanlora.AdapterConfig())
    with pytest.raises(ValueError, match="topk_only=True.*factors='bank'"):
        leanlora.save(model, tmp_path, topk_only=True)


# --- PEFT --------------------------------------------------------------------------------------


def _peft_vblora(ours):
    from peft import VBLoRAConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(), VBLoRAConfig(
        r=R, num_vectors=H, vector_length=B, topk=K, target_modules=list(ALL_PROJ), vblora_dropout=0.0,
        save_only_topk_weights=True))
    with torch.no_grad():
        peft_model.base_model.vblora_vector_bank["default"].copy_(ours.leanlora_shared.bank.vectors)
        modules = dict(peft_model.base_model.model.named_modules())
        for name, layer in leanlora.adapted_layers(ours):
            logits_a, logits_b = layer.factors.peft_logits()
            modules[name].vblora_logits_A["default"].copy_(logits_a)
            modules[name].vblora_logits_B["default"].copy_(logits_b)
    return peft_model.eval()


def test_forward_and_parameter_count_equal_peft_vblora():
    ours = bank_model()
    theirs = _peft_vblora(ours)
    x = token_batch()
    ours_out = out(ours, x)
    torch.testing.assert_close(ours_out, theirs(input_ids=x).logits.detach(), rtol=1e-6, atol=1e-6)
    with leanlora.disable_adapters(ours):
        assert (ours_out - out(ours, x)).abs().max() > 0.1   # the adapters do change the output
    ours_trainable = sum(p.numel() for _, p in leanlora.trainable_parameters(ours))
    assert ours_trainable == theirs.get_nb_trainable_parameters()[0]
    n_sub = sum(layer.factors.num_subvectors for _, layer in leanlora.adapted_layers(ours))
    assert theirs.base_model.get_nb_savable_parameters()[0] == int(float32_equivalents(H, B, n_sub, K))


def test_export_to_peft_lora_reproduces_outputs(tmp_path):
    from peft import PeftModel

    ours = bank_model()
    leanlora.export_peft(ours, tmp_path)
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    x = token_batch()
    torch.testing.assert_close(peft_model(input_ids=x).logits.detach(), out(ours, x), rtol=1e-5, atol=1e-5)


# --- the other axes --------------------------------------------------------------------------

AXES = [("nested", "float", "dense"), ("fixed", "float", "nf4"), ("gated", "learned", "dense"),
        ("nested", "fixed", "nf4")]
NEEDS = {("ranks", "nested"): "leanlora.ranks.nested", ("ranks", "gated"): "leanlora.ranks.gated",
         ("precision", "fixed"): "leanlora.precision.fixed",
         ("precision", "learned"): "leanlora.precision.learned", ("base", "nf4"): "leanlora.base.nf4"}


@pytest.mark.parametrize("ranks, precision, base", AXES, ids=["-".join(a) for a in AXES])
def test_bank_trains_and_topk_roundtrips_with_other_axes(ranks, precision, base, tmp_path):
    for axis in (("ranks", ranks), ("precision", precision), ("base", base)):
        if axis in NEEDS:
            pytest.importorskip(NEEDS[axis])
    model = bank_model(ranks=ranks, precision=precision, base=base,
                       nf4=leanlora.NF4Config(block_size=32, scaler_block_size=32))
    model.train()
    opt = torch.optim.AdamW(leanlora.param_groups(model, lr=1e-2))
    x = token_batch()
    for step in range(2):
        leanlora.advance(model, step)
        loss = model(x, labels=x).loss + leanlora.regularizer(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    leanlora.save(model, tmp_path, topk_only=True)
    loaded = leanlora.load(tiny_llama(), tmp_path)
    reloaded = dict(leanlora.adapted_layers(loaded))
    for name, layer in leanlora.adapted_layers(model):   # fp32 log/exp rounding only
        torch.testing.assert_close(reloaded[name].delta_weight(), layer.delta_weight(), rtol=1e-5, atol=1e-6)
    # the tiny random Llama amplifies that rounding ~100x by the logits
    torch.testing.assert_close(out(loaded), out(model), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dims, expected", [((384, 1536), 128), ((576, 1536, 192), 64), ((4096, 11008), 256)])
def test_auto_vector_length_is_the_longest_that_divides_every_adapted_dimension(dims, expected):
    from leanlora.inject import resolve_vector_length

    config = leanlora.AdapterConfig(factors="bank")
    shapes = {f"m{i}": (d, dims[0]) for i, d in enumerate(dims)}
    assert config.bank.vector_length == "auto"
    assert resolve_vector_length(config, shapes).bank.vector_length == expected


def test_auto_vector_length_without_a_common_length_names_the_module():
    from leanlora.inject import resolve_vector_length

    with pytest.raises(leanlora.ConfigError, match=r"no length .* divides every adapted dimension \(module 'odd' is 36->20\)"):
        resolve_vector_length(leanlora.AdapterConfig(factors="bank"), {"ok": (64, 64), "odd": (36, 20)})


def test_the_saved_config_records_the_resolved_vector_length(tmp_path):
    model = leanlora.inject(tiny_llama(seed=0), leanlora.AdapterConfig(target_modules=("q_proj", "v_proj"), r=4, factors="bank"))
    assert model.leanlora_shared.config.bank.vector_length != "auto"
    leanlora.save(model, tmp_path)
    saved = json.loads((tmp_path / "leanlora_config.json").read_text())
    assert isinstance(saved["adapter"]["bank"]["vector_length"], int)
