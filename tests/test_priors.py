"""The model-wide prior: stacked groups equal the per-module sum, in value and in gradient."""

from __future__ import annotations

import pytest
import torch

import leanlora
from conftest import OpCount, tiny_llama
from leanlora.gates import priors
from leanlora.inject import shared_state
from leanlora.gates.schedule import HasPrior

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _blora(reg_type: str, layers: int = 2, **gated):
    model = tiny_llama(num_hidden_layers=layers)
    cfg = leanlora.AdapterConfig(target_modules=ALL, r=6, ranks="gated", precision="learned",
                                 gated=leanlora.GatedConfig(**gated),
                                 prior=leanlora.PriorConfig(lmbda=0.3, reg_type=reg_type))
    leanlora.inject(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # gates spread over open, undecided and closed, so every term matters
        for name, p in model.named_parameters():
            if name.endswith("log_alpha"):
                p.copy_(torch.randn_like(p) * 3)
    return model


def _per_module(model) -> torch.Tensor:
    """The reference: each module's own prior(), one at a time, in float64."""
    lmbda = shared_state(model).config.prior.lmbda
    terms = []
    for m in model.modules():  # the layers' own strategy modules, not their groups' stacked templates
        if isinstance(m, HasPrior) and m is not model and not m.stacked:
            t = m.prior_terms()
            if t is not None:
                t = priors.PriorTerms(t.log_alpha.double(), t.weights, t.chain)
                terms.append(priors.evaluate(t))
    return lmbda * torch.stack(terms).sum()


@pytest.mark.parametrize("reg_type", ["const", "bop"])
@pytest.mark.parametrize("prior", ["nested", "individual"])
def test_stacked_prior_equals_the_sum_of_module_priors(reg_type, prior):
    model = _blora(reg_type, prior=prior)
    gates = [p for n, p in model.named_parameters() if n.endswith("log_alpha")]
    together = leanlora.regularizer(model)
    together.backward()
    fast = [p.grad.clone() for p in gates]
    for p in gates:
        p.grad = None
    reference = _per_module(model)
    reference.backward()
    assert together.dtype == torch.float32
    torch.testing.assert_close(together.double(), reference, rtol=1e-6, atol=0)
    for f, p in zip(fast, gates):
        torch.testing.assert_close(f, p.grad, rtol=1e-5, atol=1e-7)  # fp32 vs float64


def test_prior_cost_does_not_grow_with_the_number_of_layers():
    counts = {}
    for layers in (1, 4):
        model = _blora("bop", layers=layers)
        leanlora.regularizer(model)  # first call fills the price cache
        with OpCount() as ops:
            leanlora.regularizer(model).backward()
        counts[layers] = ops.n
    print("operators per prior forward+backward:", counts)
    # 7 modules per layer, 3 or 4 gate vectors each: per-module evaluation took ~30 operators each
    # (hundreds for 4 layers); stacked, only the gradient hand-back to each gate tensor grows
    assert counts[4] < 2 * counts[1] + 120


def test_finalized_model_has_no_prior_left():
    model = _blora("const")
    leanlora.finalize(model)
    assert float(leanlora.regularizer(model)) == 0.0


def test_a_changed_price_is_not_served_from_the_cache():
    model = _blora("bop")
    before = float(leanlora.regularizer(model).detach())
    shared_state(model).prior_scale.value *= 2  # every BOP price halves
    after = float(leanlora.regularizer(model).detach())
    assert after == pytest.approx(before / 2, rel=1e-5)


def test_a_model_without_priors_gets_a_zero_on_its_own_device():
    """Added to a GPU loss every step, a CPU zero would be a blocking host-to-device copy."""
    from leanlora.config import AdapterConfig

    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1))
    leanlora.inject(model, AdapterConfig(target_modules=("q_proj",), r=2))
    zero = leanlora.regularizer(model)
    assert zero.device.type == "meta" and zero.shape == ()
