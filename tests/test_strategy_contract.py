"""Each axis declares one protocol, and every strategy of that axis satisfies it, before and after
finalize: the layer, finalize and the cost report reach the strategies only through it."""

from __future__ import annotations

import itertools

import pytest

import leanlora
from conftest import tiny_llama
from leanlora.base import BaseWeight
from leanlora.factors import Factors
from leanlora.precision import Quantizer
from leanlora.ranks import RankSelector

GRID = list(itertools.product(("dense", "bank"), ("fixed", "nested", "gated"), ("float", "fixed", "learned")))


def _check(model) -> set[str]:
    seen = set()
    for name, layer in leanlora.adapted_layers(model):
        for part, protocol in ((layer.factors, Factors), (layer.ranks, RankSelector), (layer.quant_a, Quantizer),
                               (layer.quant_b, Quantizer), (layer.base, BaseWeight)):
            assert isinstance(part, protocol), f"{name}: {type(part).__name__} lacks part of {protocol.__name__}"
            seen.add(type(part).__name__)
    return seen


@pytest.mark.parametrize("factors, ranks, precision", GRID, ids=["-".join(c) for c in GRID])
def test_every_strategy_keeps_its_axis_contract(factors, ranks, precision):
    model = tiny_llama()
    config = leanlora.AdapterConfig(target_modules=("q_proj", "v_proj"), r=4, alpha=8, factors=factors, ranks=ranks,
                                    precision=precision, bank=leanlora.BankConfig(num_vectors=16, vector_length=16,
                                                                                  topk=2))
    leanlora.inject(model, config)
    before = _check(model)
    leanlora.finalize(model)
    after = _check(model)
    assert {"DenseFactors", "BankFactors"} & before and "DenseBase" in before
    if factors == "dense":
        assert "PackedFactors" in after


def test_quantized_bases_keep_the_base_contract():
    pytest.importorskip("torchao")
    model = tiny_llama()
    config = leanlora.AdapterConfig(target_modules=("q_proj",), r=4, base="nf4",
                                    nf4=leanlora.NF4Config(block_size=32, scaler_block_size=32))
    leanlora.inject(model, config)
    assert "NF4Base" in _check(model)
