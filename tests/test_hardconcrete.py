"""Hard-concrete gate math against its closed forms (Louizos et al. 2018; Bayesian Bits)."""

from __future__ import annotations

import math

import pytest
import torch

from leanlora.gates import hardconcrete as hc


def test_constants_are_the_papers():
    assert (hc.BETA, hc.GAMMA, hc.ZETA, hc.THRESHOLD) == (2 / 3, -0.1, 1.1, 0.34)


@pytest.mark.parametrize("log_alpha", [-3.0, -1.0, 0.0, 1.5, 4.0])
def test_open_and_one_probabilities_match_monte_carlo(log_alpha):
    g = torch.Generator().manual_seed(0)
    n = 400_000
    u = torch.rand(n, generator=g, dtype=torch.float64)
    z = hc.sample(torch.full((n,), log_alpha, dtype=torch.float64), u)
    la = torch.tensor(log_alpha, dtype=torch.float64)
    # binomial std at n=4e5 is <= 8e-4; 4e-3 is 5 sigma
    assert abs(float((z > 0).double().mean() - hc.prob_open(la))) < 4e-3
    assert abs(float((z == 1).double().mean() - hc.prob_one(la))) < 4e-3
    assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0


def test_prob_open_closed_form():
    # P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta)); -beta log(-gamma/zeta) = 1.5986
    la = torch.tensor([0.0, 6.0, -2.0])
    want = torch.sigmoid(la - (2 / 3) * math.log(0.1 / 1.1))
    torch.testing.assert_close(hc.prob_open(la), want)
    assert abs(float(hc.prob_open(torch.tensor(0.0))) - 1 / (1 + math.exp(-1.5986))) < 1e-4
    # the B-LoRA default init 6.0 starts the gates nearly surely open
    assert float(hc.prob_open(torch.tensor(6.0))) == pytest.approx(0.9995, abs=1e-4)


def test_sample_formula_at_a_fixed_u():
    # u = 1/2: s = sigmoid(log_alpha / beta); z = clamp(1.2 s - 0.1, 0, 1)
    la = torch.tensor([0.0, 0.3, -5.0, 5.0])
    z = hc.sample(la, torch.full_like(la, 0.5))
    want = (torch.sigmoid(la / (2 / 3)) * 1.2 - 0.1).clamp(0, 1)
    torch.testing.assert_close(z, want)
    assert float(z[0]) == pytest.approx(0.5) and float(z[2]) == 0.0 and float(z[3]) == 1.0


def test_deterministic_gate_threshold_boundary():
    # open exactly when P(z = 0) < threshold, i.e. q > 1 - threshold
    for thr in (0.34, 0.1, 0.9):
        la0 = hc.log_alpha_for(1 - thr)
        gates = hc.deterministic(torch.tensor([la0 - 1e-3, la0 + 1e-3], dtype=torch.float64), thr)
        assert gates.tolist() == [0.0, 1.0]
    assert hc.prob_open(torch.tensor(hc.log_alpha_for(0.3))).item() == pytest.approx(0.3)
    with pytest.raises(ValueError, match="q=1.5 is invalid"):
        hc.log_alpha_for(1.5)


def test_round_ste_rounds_forward_and_passes_gradient():
    x = torch.tensor([0.2, 0.7, -1.4, 2.5], requires_grad=True)
    y = hc.round_ste(x)
    assert y.tolist() == [0.0, 1.0, -1.0, 2.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_gradient_of_open_probability_reaches_log_alpha():
    la = torch.zeros(3, requires_grad=True)
    hc.prob_open(la).sum().backward()
    q = hc.prob_open(torch.zeros(3))
    torch.testing.assert_close(la.grad, q * (1 - q))


def test_open_chain_is_the_cumulative_product_of_open_probabilities_with_its_gradient():
    log_alpha = torch.tensor([6.0, 0.3, -2.0, -9.0, 1.5], dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0], dtype=torch.float64)
    (hc.open_chain(log_alpha) * weights).sum().backward()
    got = log_alpha.grad.clone()
    log_alpha.grad = None
    want = torch.cumprod(hc.prob_open(log_alpha), 0)
    (want * weights).sum().backward()
    torch.testing.assert_close(hc.open_chain(log_alpha.detach()), want.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(got, log_alpha.grad, rtol=1e-10, atol=1e-14)


def test_prefix_product_compiled_equals_cumprod_with_zeros_and_gradients():
    # hard-concrete samples are exactly 0 or 1 often; the unrolled compiled form must agree with
    # cumprod (and its zero-safe gradient) there too
    z = torch.tensor([0.7, 1.0, 0.0, 0.4, 0.9, 0.0, 0.5], dtype=torch.float64)
    weights = torch.arange(1.0, 8.0, dtype=torch.float64)

    def chain_loss(x):
        return (hc.prefix_product(x) * weights).sum()

    eager_z = z.clone().requires_grad_(True)
    chain_loss(eager_z).backward()
    compiled_z = z.clone().requires_grad_(True)
    value = torch.compile(chain_loss, backend="aot_eager", fullgraph=True)(compiled_z)
    value.backward()
    torch.testing.assert_close(value.detach(), chain_loss(z), rtol=1e-12, atol=0)
    torch.testing.assert_close(compiled_z.grad, eager_z.grad, rtol=1e-12, atol=0)
    assert hc.prefix_product(z[:1]).tolist() == [0.7] and hc.prefix_product(z[:0]).numel() == 0
