"""Fake-quantizers (fixed and Bayesian Bits learned bits) and bit-packing of their codes."""

from __future__ import annotations

import math

import pytest
import torch

from leanlora.gates import hardconcrete as hc
from leanlora.artifact.packing import StoredTensor, pack_codes, packed_nbytes, unpack_codes
from leanlora.precision.fixed import FixedBits, FrozenBits
from leanlora.precision.learned import LearnedBits, PriorScale, grid_scale

OPEN, CLOSED = 8.0, -8.0


def _w(seed=0, shape=(8, 32)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05


def _learned_at(bits, bit_set=(2, 4, 8, 16, 32)):
    """A LearnedBits whose eval gates select exactly ``bits``."""
    q = LearnedBits(bit_set).eval()
    k = bit_set.index(bits)
    with torch.no_grad():
        q.log_alpha.copy_(torch.tensor([OPEN if i < k else CLOSED for i in range(len(bit_set) - 1)]))
    return q


def _rel_err(a, b):
    return float((a - b).detach().norm() / b.norm())


# --- fixed bits -------------------------------------------------------------------------------


def test_fixed_16_bits_is_nearly_identity_and_32_is_identity():
    w = _w()
    assert _rel_err(FixedBits(16)(w), w) < 1e-4
    assert torch.equal(FixedBits(32)(w), w)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fixed_bits_level_count(bits):
    levels = FixedBits(bits).eval()(_w()).unique().numel()
    assert levels <= 2 ** bits - 1  # symmetric grid: 3 levels at 2 bits, 15 at 4, 255 at 8


def test_fixed_bits_straight_through_gradient_and_codes():
    w = _w().requires_grad_(True)
    FixedBits(4)(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    q = FixedBits(4).eval()
    codes, scale = q.encode(w)
    assert int(codes.abs().max()) == 7
    torch.testing.assert_close(codes.float() * scale, q(w.detach()))


def test_quantizer_of_an_all_zero_tensor_is_zero_not_nan():
    # LoRA's B starts at exactly 0: no first-use range can be taken from it
    zeros = torch.zeros(4, 16)
    for q in (FixedBits(4), LearnedBits(), _learned_at(2)):
        out = q(zeros)
        assert torch.equal(out, zeros)


# --- learned bits -----------------------------------------------------------------------------


def test_learned_16_bits_is_nearly_identity_and_32_is_identity():
    w = _w()
    assert _rel_err(_learned_at(16)(w), w) < 1e-4
    assert torch.equal(_learned_at(32)(w), w)  # eval picks the float level exactly
    assert _learned_at(16).bits() == 16 and _learned_at(32).bits() == 32


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_learned_bits_levels_and_grid(bits):
    w = _w(shape=(64, 64))
    q = _learned_at(bits)
    out = q(w)
    assert out.unique().numel() <= 2 ** bits - 1  # 2 bits: at most 3 (<= 4) levels
    # the nested residual sum lands on the symmetric b-bit grid s_b = 2 x_max / (2^b - 1)
    s = grid_scale(w.abs().max(), bits)
    codes = out / s
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3 + 2 ** bits * 1e-7)
    assert float(codes.detach().abs().max().round()) <= 2 ** (bits - 1) - 1


def test_learned_bits_default_init_starts_at_float():
    q = LearnedBits()  # init_log_alpha 6.0: every gate open
    assert q.bits() == 32 and q.expected_bits() == pytest.approx(32.0, abs=0.1)


def test_learned_bits_subset_of_widths():
    q = _learned_at(8, bit_set=(2, 8, 32))
    assert q.bits() == 8 and q(_w()).unique().numel() <= 255
    with pytest.raises(ValueError, match="bit_set"):
        LearnedBits((4, 8))
    with pytest.raises(ValueError, match="bit_set"):
        LearnedBits((2, 3))


def test_learned_bits_training_gates_are_sampled_and_gradients_flow():
    q = LearnedBits(init_log_alpha=0.0).train()
    w = _w().requires_grad_(True)
    q(w).pow(2).sum().backward()
    assert q.log_alpha.grad is not None and torch.isfinite(q.log_alpha.grad).all()
    assert q.log_scale.grad is not None and torch.isfinite(q.log_scale.grad)
    assert torch.isfinite(w.grad).all()
    assert LearnedBits.PARAM_ROLES == {"log_alpha": "gates", "log_scale": "scales"}


def test_learned_scale_clips_quantized_levels_but_not_float():
    w = _w()
    absmax = float(w.abs().max())
    for bits, want in ((8, 0.5 * absmax), (32, absmax)):  # the float level is the unclipped w
        q = _learned_at(bits)
        with torch.no_grad():
            q.log_scale.fill_(math.log(0.5))
            y = q(w)
        assert float(y.abs().max()) == pytest.approx(want, rel=1e-2)


def _residual_reference(w, log_scale, gates, bit_set):
    """The Bayesian Bits recursion as written in the paper, in float64, rounding straight-through:
    r_0 = s_0 ⌊x_c/s_0⌉, r_k = s_k ⌊(x_c - Σ r)/s_k⌉, r_float = w - Σ r; w~ = r_0 + z_1 (r_1 + z_2 (...))."""
    w64 = w.double()
    x_max = log_scale.double().exp() * w64.detach().abs().max()
    lim = x_max * (1 - 1e-7)
    xc = torch.minimum(torch.maximum(w64, -lim), lim)
    parts, acc = [], torch.zeros_like(w64)
    for b in bit_set:
        if b == 32:
            parts.append(w64 - acc)
            break
        s = 2 * x_max / (2 ** b - 1)
        y = (xc - acc) / s
        r = s * (y + (torch.round(y) - y).detach())
        parts.append(r)
        acc = acc + r
    out = parts[-1]
    for k in range(len(parts) - 2, -1, -1):
        out = parts[k] + gates.double()[k] * out
    return out


@pytest.mark.parametrize("bit_set", [(2, 4, 8, 16, 32), (2, 8, 32), (2, 4, 16)])
def test_closed_form_levels_equal_the_residual_recursion_and_its_gradients(bit_set):
    """The quantizer sums all levels at once; it must be the paper's recursion, values and STE gradients."""
    for seed in range(3):
        w = _w(seed, shape=(16, 48)).requires_grad_(True)
        q = LearnedBits(bit_set, init_log_alpha=0.5).train()
        with torch.no_grad():
            q.log_scale.fill_(math.log(0.8))           # clip some of w: the range gradient is exercised
        torch.manual_seed(seed)
        out = q(w)
        out.pow(2).sum().backward()
        got = (out.detach().clone(), w.grad.clone(), q.log_scale.grad.clone(), q.log_alpha.grad.clone())

        w.grad = None
        log_scale = q.log_scale.detach().clone().requires_grad_(True)
        log_alpha = q.log_alpha.detach().clone().requires_grad_(True)
        torch.manual_seed(seed)                          # the same gate draws
        ref = _residual_reference(w, log_scale, hc.sample(log_alpha), bit_set)
        ref.pow(2).sum().backward()
        # fp32 vs fp64 may round a near-tie to the other side: at most one step of the finest grid,
        # on a handful of elements; everything else agrees to fp32 precision
        finest = 2 * float(q.x_max(w).detach()) / (2 ** max(b for b in bit_set if b < 32) - 1)
        diff = (got[0].double() - ref.detach()).abs()
        assert float(diff.max()) <= finest * 1.01 and int((diff > 1e-6).sum()) <= 2, diff.max()
        if int((diff > 1e-6).sum()) == 0:
            torch.testing.assert_close(got[1], w.grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got[2], log_scale.grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got[3], log_alpha.grad, rtol=1e-4, atol=1e-6)


def test_sixteen_bit_codes_stay_on_the_grid_at_the_range_ends():
    """x_c / s_16 = ±32767.4999 rounds to 32767.5 in fp32; the codes must still fit int16."""
    w = torch.linspace(-1.0, 1.0, 4001) * 0.37
    q = _learned_at(16)
    codes, scale = q.encode(w)
    assert int(codes.abs().max()) == 2 ** 15 - 1
    torch.testing.assert_close(codes.float() * scale, q(w), rtol=0, atol=1e-9)


def test_expected_bits_and_prior_closed_forms():
    ps = PriorScale()
    ps.update(1000.0)
    q = LearnedBits(init_log_alpha=0.0, reg_type="bop", macs=250.0, prior_scale=ps)
    with torch.no_grad():
        q.log_alpha.copy_(torch.tensor([1.0, 0.0, -1.0, 2.0]))
    p = hc.prob_open(q.log_alpha.detach())
    chain = torch.cumprod(p, 0)
    assert q.expected_bits() == pytest.approx(float(2 + chain @ torch.tensor([2.0, 4.0, 8.0, 16.0])), rel=1e-6)
    # bop: c_k = (MACs / max MACs) · b_k  (METHODS.md §1.5)
    want = 0.25 * float(chain @ torch.tensor([4.0, 8.0, 16.0, 32.0]))
    assert float(q.prior().detach()) == pytest.approx(want, rel=1e-6)
    q.reg_type = "const"
    assert float(q.prior().detach()) == pytest.approx(float(chain.sum()), rel=1e-6)


def test_encode_reproduces_eval_output():
    w = _w(shape=(6, 40))
    for bits in (2, 4, 8, 16):
        q = _learned_at(bits)
        codes, scale = q.encode(w)
        assert codes.dtype == torch.int32 and int(codes.abs().max()) <= 2 ** (bits - 1) - 1
        torch.testing.assert_close(codes.float() * scale, q(w), rtol=1e-6, atol=1e-8)  # one ulp of the residual sum
    assert _learned_at(32).encode(w) is None


def test_frozen_bits_keeps_the_grid():
    w = _w()
    q = _learned_at(4)
    codes, scale = q.encode(w)
    frozen = FrozenBits(4, scale)
    torch.testing.assert_close(frozen(w), q(w), rtol=0, atol=1e-6)
    # pruning rows changes max|w| but not a frozen grid
    torch.testing.assert_close(frozen(w[:3]), q(w)[:3], rtol=0, atol=1e-6)


# --- packing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("numel", [1, 7, 64, 1001])
def test_pack_round_trip(bits, numel):
    n = 2 ** (bits - 1) - 1
    g = torch.Generator().manual_seed(bits * numel)
    codes = torch.randint(-n, n + 1, (numel,), generator=g, dtype=torch.int32)
    codes[0] = -n
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(numel, bits) == math.ceil(numel * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, numel), codes)


def test_pack_refuses_out_of_range_codes():
    with pytest.raises(ValueError, match="outside the signed 2-bit range"):
        pack_codes(torch.tensor([2]), 2)
    with pytest.raises(ValueError, match="bits=3 is invalid"):
        pack_codes(torch.tensor([1]), 3)


def test_stored_tensor_dequantizes_and_counts_bytes():
    w = _w(shape=(5, 24))
    q = _learned_at(4)
    codes, scale = q.encode(w)
    st = StoredTensor.from_codes(codes, scale, 4, torch.float32)
    torch.testing.assert_close(st(), codes.float() * scale)
    assert st.nbytes() == 60 + 4 == sum(t.numel() * t.element_size() for t in st.state_dict().values())
    st.select_(torch.tensor([0, 2]), 0)
    assert st.shape == (2, 24)
    torch.testing.assert_close(st(), (codes.float() * scale)[[0, 2]])


def test_a_member_of_one_number_keeps_its_own_peak():
    """Stacked members that are one number each (a (G,) stack): no dim to reduce, one peak per member."""
    from leanlora.precision.fixed import member_peak

    w = torch.tensor([1.0, -3.0, 2.0])
    torch.testing.assert_close(member_peak(w, ()), torch.tensor([1.0, 3.0, 2.0]))
    torch.testing.assert_close(member_peak(w.reshape(3, 1), (1,)), torch.tensor([[1.0], [3.0], [2.0]]))
