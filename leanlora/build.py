"""Turn an :class:`AdapterConfig` into strategy objects for one target module.

This is the only place where config fields become constructor arguments; layer and strategy
classes take flat, typed arguments and never see a config object.
"""

from __future__ import annotations

import torch
from torch import nn

from leanlora.base.bnb4 import Bnb4Base, is_linear4bit
from leanlora.base.dense import DenseBase, linear_shape
from leanlora.config import AdapterConfig
from leanlora.factors.dense import DenseFactors
from leanlora.layer import AdaptedLinear
from leanlora.precision.full import FullPrecision
from leanlora.precision.learned import PriorScale
from leanlora.ranks.fixed import FixedRanks

def adapter_dtype(config: AdapterConfig) -> torch.dtype:
    return getattr(torch, config.adapter_dtype)  # "float32", "bfloat16" or "float16" (the config checks)


class Shared(nn.Module):
    """Model-wide adapter state, registered once on the model as ``leanlora_shared``.

    Holds what every adapted layer shares (the VB-LoRA bank, the nested-rank sampler) so that
    ``model.to(...)`` moves it and the optimizer sees each shared parameter once.
    """

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        # set by leanlora.finalize: gates thresholded, ranks pruned, factors packed (io.save records it)
        self.finalized = False
        # largest full-rank adapter MACs/token over the layers, raised by build_layer as it goes:
        # the normaliser of the BOP-aware gate priors (prior.reg_type="bop")
        self.prior_scale = PriorScale()
        # the groups of layers that share stacked parameters (leanlora.groups.stacking)
        self.groups = nn.ModuleList()
        # set by leanlora.groups.stacking.compile_pieces under CUDA graphs: layers compute their own pieces
        self.off_for_graphs = False

    def forward(self, x):
        # A holder, not a layer; identity so that a plain nn.Sequential root still computes the same.
        return x


def build_shared(config: AdapterConfig, device: torch.device | None) -> Shared:
    shared = Shared(config)
    if config.factors == "bank":
        from leanlora.factors.bank import VectorBank

        b = config.bank
        shared.bank = VectorBank(b.num_vectors, b.vector_length, b.bank_init_range,
                                 dtype=adapter_dtype(config), device=device)
    if config.ranks == "nested":
        from leanlora.ranks.nested import RankSampler

        n = config.nested
        shared.rank_sampler = RankSampler(n.r_min, config.r, n.distribution, decay=n.decay, seed=n.seed,
                                          device=device, full_share=n.full_share)
    return shared


def build_layer(module: nn.Module, name: str, config: AdapterConfig, shared: Shared,
                quantize_base: bool = True) -> AdaptedLinear:
    """Wrap one supported linear module; its weight is not changed (an NF4 or FP8 base is a
    quantized copy of it). ``quantize_base=False`` keeps the base dense for now (see :func:`_build_base`)."""
    in_f, out_f = linear_shape(module)
    device = module.weight.device
    dtype = adapter_dtype(config)
    r = config.r
    # VB-LoRA's update is plain B·A: alpha = r gives alpha/r = 1 at the full rank (factors/bank.py).
    unscaled = config.factors == "bank" and not config.bank.scaled
    alpha, rslora = (float(r), False) if unscaled else (config.alpha, config.rslora)

    if config.factors == "dense":
        factors: nn.Module = DenseFactors(in_f, out_f, r, dtype=dtype, device=device)
    else:
        from leanlora.factors.bank import BankFactors

        factors = BankFactors(shared.bank, in_f, out_f, r, config.bank.topk, config.bank.logits_init_std,
                              name=name, dtype=dtype, device=device)

    if config.ranks == "fixed":
        ranks: nn.Module = FixedRanks(r, alpha, rslora)
    elif config.ranks == "nested":
        from leanlora.ranks.nested import NestedRanks

        n = config.nested
        ranks = NestedRanks(r, alpha, shared.rank_sampler, frozen=n.frozen,
                            eval_rank=n.eval_rank, rslora=rslora, name=name, device=device, scale=n.scale)
    else:
        from leanlora.ranks.gated import GatedRanks

        g = config.gated
        # E (r,) is consumed by r MACs/token; a component costs in + out + 1 MACs/token
        quant_e = _build_quantizer(config, dtype, r, shared.prior_scale, device) if g.diag else None
        ranks = GatedRanks(r, alpha, diag=g.diag, init_log_alpha=config.gates.rank_init_log_alpha,
                           threshold=config.gates.threshold, nested=g.nested, prior=g.prior,
                           rslora=rslora, quant_e=quant_e, reg_type=config.prior.reg_type,
                           component_macs=in_f + out_f + 1, prior_scale=shared.prior_scale,
                           dtype=dtype, device=device)

    shared.prior_scale.update((in_f + out_f) * r)
    # MACs/token that consume A (in·r) and B (r·out): the weights of the "bop" bit prior
    quant_a = _build_quantizer(config, dtype, in_f * r, shared.prior_scale, device)
    quant_b = _build_quantizer(config, dtype, out_f * r, shared.prior_scale, device)
    base = Bnb4Base(module, name) if is_linear4bit(module) else DenseBase(module)
    layer = AdaptedLinear(base, factors, ranks, quant_a, quant_b, dropout=config.dropout, name=name)
    layer.base_digest = None  # recorded once, at the first save (leanlora.artifact.identity.record_layer_digest)
    if quantize_base and isinstance(base, DenseBase) and config.base in ("nf4", "fp8"):
        _quantize_base(layer, name, config)
    layer.train(module.training)  # a model in eval mode stays in eval mode (dropout, sampled ranks)
    return layer


def _quantize_base(layer: AdaptedLinear, name: str, config: AdapterConfig) -> None:
    """Give ``layer`` the NF4 or FP8 copy of its dense base; the digest of the plain weight is taken
    first, since that is what a later load compares against.

    :func:`leanlora.load` builds with ``quantize_base=False`` and quantizes only after every tensor
    loaded (:func:`leanlora.base.nf4.quantize_bases`), so that a failed load leaves the model as it was.
    """
    from leanlora.artifact.identity import record_layer_digest

    record_layer_digest(layer)
    if config.base == "nf4":
        from leanlora.base.nf4 import NF4Base

        layer.base = NF4Base.from_dense(layer.base, name=name, block_size=config.nf4.block_size,
                                        scaler_block_size=config.nf4.scaler_block_size, gemm=config.nf4.gemm)
    else:
        from leanlora.base.fp8 import FP8Base

        layer.base = FP8Base.from_dense(layer.base, name=name, transposed_copy=config.fp8.transposed_copy)


def _build_quantizer(config: AdapterConfig, dtype: torch.dtype, macs: int, prior_scale: PriorScale,
                     device: torch.device | None) -> nn.Module:
    if config.precision == "float":
        return FullPrecision(torch.finfo(dtype).bits)
    q = config.quant
    if config.precision == "fixed":
        from leanlora.precision.fixed import FixedBits

        return FixedBits(q.bits)
    from leanlora.precision.learned import LearnedBits

    return LearnedBits(q.bit_set, init_log_alpha=config.gates.bit_init_log_alpha, threshold=config.gates.threshold,
                       reg_type=config.prior.reg_type, macs=macs, prior_scale=prior_scale, device=device)
