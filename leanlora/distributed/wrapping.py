"""Hand an adapted model to DDP or FSDP2 (``fully_shard``); nothing here is a home-made engine.

Decisions, each forced by what the adapter shares between layers:
  * FSDP2 groups: one per decoder layer (``model._no_split_modules``), then the root. Every
    trained tensor of the adapted layers lives in ``model.leanlora_shared`` (their stacked
    parameters, the VB-LoRA bank, the nested-rank sampler), a child of the root and of no layer,
    so it falls in the root group; the decoder-layer groups shard the frozen base. The root is
    not resharded after forward, so the stacks stay gathered while every layer reads its rows,
    each stack's gradient accumulates over its layers in backward, one reduce-scatter at the end
    averages it over ranks, and :func:`regularizer` reads whole gates after the forward.
  * NF4 and FP8 bases under FSDP2: torchao's ``NF4Tensor`` implements the FSDP2 all-gather hooks,
    and FSDP2 gathers float8 tensors as it does any other, but both bases keep their tensors as
    plain attributes (so ``.to(dtype)`` cannot dequantize or cast them). ``wrap`` registers them
    as frozen parameters so that they are sharded; call ``wrap`` after every ``.to()``.
  * Same init on every rank: DDP broadcasts rank 0's parameters; for FSDP2 ``wrap`` does it
    before sharding (the NF4 tensors are quantized from identical dense weights).
  * Nested ranks draw b from (seed, step) alone (:mod:`leanlora.ranks.nested`); :func:`sync_seed`
    makes the seed rank 0's, so every rank trains the same b in a step. Gate noise is drawn
    from torch's global generator: :func:`rank_seed` gives each rank its own stream after init.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from leanlora.distributed.process import MODES, DistributedError, is_distributed, launched, sync_seed, world_size
from leanlora.targets import repeated_blocks

_MODE_ATTR = "_leanlora_distributed"      # set on the wrapped model: "ddp" | "fsdp2"


def mode_of(model: nn.Module) -> str:
    return getattr(model, _MODE_ATTR, "none")


def unwrap(model: nn.Module) -> nn.Module:
    """The model leanlora's functions take (DDP's ``.module``; FSDP2 wraps in place)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def wrap(model: nn.Module, mode: str, *, layer_classes: Sequence[str | type] | None = None,
         find_unused_parameters: bool = False, sync_params: bool = True, mp_policy: Any = None) -> nn.Module:
    """Hand ``model`` (adapted, on its device) to DDP or FSDP2; returns the model to call.

    ``mode``: "none" (returned as is), "ddp" (a ``DistributedDataParallel`` wrapper; leanlora's
    functions take :func:`unwrap` of it) or "fsdp2" (``fully_shard`` per decoder layer, then the
    root; the model object stays the same). ``layer_classes`` overrides the decoder-layer classes
    (default: the model's ``_no_split_modules``).
    """
    if mode not in MODES:
        raise DistributedError(f"train.distributed={mode!r} is invalid: allowed {list(MODES)}")
    if mode == "none" or (launched() and world_size() == 1):  # one launched process: nothing to split
        return model
    if not is_distributed():
        raise DistributedError(f"train.distributed={mode!r} needs several processes; launch with "
                               "`torchrun --nproc_per_node N -m leanlora train ...` or `accelerate launch`")
    if mode_of(model) != "none":
        raise DistributedError(f"the model is already wrapped for {mode_of(model)!r}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if mode == "ddp":
        wrapped = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                          find_unused_parameters=find_unused_parameters)
        setattr(wrapped, _MODE_ATTR, "ddp")
        return wrapped
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from leanlora.artifact.identity import record_base_digests

    if hasattr(model, "leanlora_shared"):
        record_base_digests(model)  # of the whole base, now: after sharding no rank holds it whole
    _refuse_bnb4(model)
    mesh = init_device_mesh(device.type, (world_size(),))
    nf4_names = _nf4_as_parameters(model)
    fp8_names = _fp8_as_parameters(model)
    if sync_params:
        _broadcast_from_main(model)
    layers = decoder_layers(model, layer_classes)
    kwargs = {"mesh": mesh, "ignored_params": _replicate_scalars(model) or None,
              "mp_policy": mp_policy or MixedPrecisionPolicy()}  # None: fully_shard's default policy
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True, **kwargs)
    # The root holds leanlora_shared (the groups' stacks, the bank, the sampler): see the module docstring.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    setattr(model, _MODE_ATTR, "fsdp2")
    model._leanlora_nf4_params = nf4_names
    model._leanlora_fp8_params = fp8_names
    return model


def _replicate_scalars(model: nn.Module) -> set[nn.Parameter]:
    """fully_shard refuses 0-dim parameters (a learned quantizer range): keep them replicated.

    They stay whole on every rank and their gradient is averaged over ranks as soon as it has
    been accumulated (DDP's rule), so every copy takes the same optimizer step.
    """
    scalars = {p for p in model.parameters() if p.dim() == 0 and p.requires_grad}
    for p in scalars:
        p.register_post_accumulate_grad_hook(_average_grad)
    return scalars


def _average_grad(p: torch.Tensor) -> None:
    # Micro-batch k adds its local gradient to an average that is already the same on every rank,
    # so averaging again after each accumulation still yields the mean of all ranks' sums.
    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
    p.grad.div_(world_size())


def decoder_layers(model: nn.Module, layer_classes: Sequence[str | type] | None = None) -> list[nn.Module]:
    """The transformer blocks, outermost first, in model order: one FSDP2 group each.

    Found by :func:`leanlora.targets.repeated_blocks` (``layer_classes``, else the model's
    ``_no_split_modules``, else its largest list of same-class blocks), the rule regional
    compilation uses too.
    """
    found = repeated_blocks(model, layer_classes)
    if not found:
        names = sorted(c if isinstance(c, str) else c.__name__ for c in layer_classes or ())
        rule = (f"no module has a class in {names}" if layer_classes is not None
                else "neither its _no_split_modules nor a list of same-class blocks names one")
        raise DistributedError(f"found no transformer block in {type(model).__name__}: {rule}; "
                               "pass layer_classes= (the block's class) to leanlora.distributed.wrap")
    return found


def _broadcast_from_main(model: nn.Module) -> None:
    """Copy rank 0's plain parameters and buffers to every rank (FSDP2 does not, DDP does)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if type(t) in (torch.Tensor, nn.Parameter) and t.is_floating_point():
                # float8 codes travel as their bytes: not every backend (gloo) takes float8
                dist.broadcast(t.data.view(torch.uint8) if t.element_size() == 1 else t.data, src=0)


def _refuse_bnb4(model: nn.Module) -> None:
    from leanlora.base.bnb4 import is_linear4bit

    names = [n for n, m in model.named_modules() if is_linear4bit(m)]
    if names:
        raise DistributedError(
            f"train.distributed='fsdp2' cannot shard the bitsandbytes Linear4bit base of {names[0]!r} "
            f"({len(names)} such modules): its packed Params4bit keeps its quantization state outside the "
            "tensor, which FSDP2's all-gather does not carry. Load the model in bf16 with adapter.base='nf4' "
            "(torchao NF4, sharded by FSDP2), or use train.distributed='ddp'")


def _nf4_as_parameters(model: nn.Module) -> list[str]:
    """Register every NF4 base tensor as a frozen parameter so that fully_shard shards it."""
    from leanlora.base.nf4 import NF4Base  # torchao itself is imported only when an NF4 base is built

    n = world_size()
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, NF4Base) or "weight" in module._parameters:
            continue
        w = module.weight
        groups = w.quantization_factor.numel()
        if w.size(0) % n or groups % n:
            raise DistributedError(
                f"FSDP2 cannot shard the NF4 weight of {name!r} ({tuple(w.shape)}, {groups} scaler groups) "
                f"over {n} processes: rows and scaler groups must divide by {n}; lower "
                f"adapter.nf4.scaler_block_size (now {module.scaler_block_size}) or use train.distributed=ddp")
        module.as_parameter()
        names.append(f"{name}.weight")
    return names


def _fp8_as_parameters(model: nn.Module) -> list[str]:
    """Register every FP8 base's codes and scales as frozen parameters so that fully_shard shards them."""
    from leanlora.base.fp8 import FP8Base

    names = []
    for name, module in model.named_modules():
        if isinstance(module, FP8Base) and "codes" not in module._parameters:
            module.as_parameter()
            names.append(f"{name}.codes")
    return names


def regularizer(model: nn.Module) -> torch.Tensor:
    """λ · Σ priors, as :func:`leanlora.regularizer`, for a model wrapped in any mode.

    Under FSDP2 the groups' stacked gates live in the root, which stays gathered from its forward
    to the end of its backward: call it after the forward, as in one process.
    """
    from leanlora.gates.schedule import regularizer as plain_regularizer

    return plain_regularizer(unwrap(model))


def sync_rank_sampler(model: nn.Module) -> int | None:
    """Give the nested-rank sampler rank 0's seed, so b of step t is the same on every rank."""
    sampler = getattr(getattr(unwrap(model), "leanlora_shared", None), "rank_sampler", None)
    if sampler is None:
        return None
    sampler.seed = sync_seed(sampler.seed)
    return sampler.seed

