"""Wrap the target linear layers of any ``transformers`` (or plain torch) model, and undo it.

Which modules are targets follows PEFT's rules (:mod:`leanlora.targets`): a list names modules
(the name or a dotted suffix), one string is a full-name regex, ``"all-linear"`` is every linear
layer but the output layer and a classifier head.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch
from torch import nn

from leanlora.artifact import peft_methods
from leanlora.base.bnb4 import is_linear4bit
from leanlora.base.choice import resolve_auto_base
from leanlora.base.dense import linear_shape
from leanlora.build import Shared, build_layer, build_shared
from leanlora.config import AdapterConfig, ConfigError
from leanlora.layer import AdaptedLinear
from leanlora.targets import FilterFn, InjectError, find_modules_to_save, find_targets
from leanlora.groups.siblings import link_siblings
from leanlora.groups.stacking import form_groups, refresh_pieces

SHARED_ATTR = "leanlora_shared"


def _check_shape(name: str, module: nn.Module, config: AdapterConfig) -> None:
    in_f, out_f = linear_shape(module)
    if config.r > min(in_f, out_f):
        raise ConfigError(f"r={config.r} is invalid for module {name!r} ({in_f}->{out_f}): "
                          f"r must be <= min(in, out) = {min(in_f, out_f)}")
    if config.factors == "bank":
        from leanlora.factors.bank import check_divides

        check_divides(config.bank.vector_length, in_f, out_f, name)
    if config.base in ("nf4", "fp8") and not is_linear4bit(module):  # a bitsandbytes 4-bit layer is kept as it is
        from leanlora.base.fp8 import check_fp8_shape
        from leanlora.base.nf4 import check_nf4_shape

        if config.base == "nf4":
            check_nf4_shape(name, in_f, out_f, config.nf4)
        else:
            check_fp8_shape(name, in_f, out_f)


AUTO_VECTOR_LENGTHS = (256, 128, 64, 32, 16, 8)


def resolve_vector_length(config: AdapterConfig, shapes: dict[str, tuple[int, int]]) -> AdapterConfig:
    """``bank.vector_length: auto`` made concrete: the longest of ``AUTO_VECTOR_LENGTHS`` that
    divides every adapted in/out dimension (the saved config then records the number)."""
    if config.factors != "bank" or config.bank.vector_length != "auto":
        return config
    dims = {d for shape in shapes.values() for d in shape}
    fits = [n for n in AUTO_VECTOR_LENGTHS if all(d % n == 0 for d in dims)]
    if not fits:
        odd = next(name for name, shape in shapes.items() if any(d % AUTO_VECTOR_LENGTHS[-1] for d in shape))
        raise ConfigError(f"bank.vector_length=auto: no length in {list(AUTO_VECTOR_LENGTHS)} divides every adapted "
                          f"dimension (module {odd!r} is {shapes[odd][0]}->{shapes[odd][1]}); set bank.vector_length "
                          "to a common divisor of the adapted dimensions")
    return dataclasses.replace(config, bank=dataclasses.replace(config.bank, vector_length=fits[0]))


def inject(model: nn.Module, config: AdapterConfig, *, filter_fn: FilterFn | None = None,
           quantize_base: bool = True) -> nn.Module:
    """Wrap the target linear layers of ``model`` in place, freeze everything else, return ``model``.

    ``filter_fn(module, name)`` can veto a match. ``quantize_base=False`` builds an NF4 or FP8 base
    dense for now (used by :func:`leanlora.load` so that a failed load leaves the model untouched).
    """
    if not isinstance(config, AdapterConfig):
        hint = "; convert PEFT's with leanlora.AdapterConfig.from_peft(config)" if hasattr(config, "peft_type") else ""
        raise TypeError(f"config must be a leanlora.AdapterConfig, got {type(config).__name__}{hint}")
    if hasattr(model, SHARED_ATTR):
        raise InjectError(f"{type(model).__name__} already holds leanlora adapters; call leanlora.unload(model) first")
    targets = find_targets(model, config, filter_fn)
    modules = dict(model.named_modules())
    config = resolve_vector_length(config, {name: linear_shape(modules[name]) for name in targets})
    config = resolve_auto_base(config, {name: modules[name] for name in targets})
    for name in targets:
        _check_shape(name, modules[name], config)
    save_names = find_modules_to_save(model, config)

    shared = build_shared(config, next((p.device for p in model.parameters()), None))
    # Remember every flag we change so that unload can hand back the model as it was.
    shared.original_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    shared.modules_to_save_names = save_names
    model.requires_grad_(False)
    layers = [build_layer(modules[name], name, config, shared, quantize_base=quantize_base) for name in targets]
    for name, layer in zip(targets, layers):
        model.set_submodule(name, layer)
    model.add_module(SHARED_ATTR, shared)
    form_groups(layers, shared)
    shared.__dict__["sibling_sets"] = link_siblings(targets, layers)
    # plain lists, not submodules: the layers in model order, and the modules whose
    # gradient_checkpointing flag Hugging Face sets (no grouped pieces while a re-entrant one is on)
    shared.__dict__["layers"] = layers
    shared.__dict__["checkpointable"] = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    model.register_forward_pre_hook(refresh_pieces)
    peft_methods.install(model)  # save_pretrained (warned), print_trainable_parameters, merge_and_unload, unload
    for name in save_names:
        modules[name].requires_grad_(True)
    return model


def get_model(model: nn.Module, config: AdapterConfig, **kwargs) -> nn.Module:
    """:func:`inject` under the name of PEFT's ``get_peft_model``: adapts ``model`` in place and
    returns it, for code written as ``model = get_peft_model(model, config)``. Unlike PEFT, the
    model is not wrapped: it keeps its class, and ``leanlora.save`` / ``leanlora.unload`` take it."""
    return inject(model, config, **kwargs)


def shared_state(model: nn.Module) -> Shared:
    shared = getattr(model, SHARED_ATTR, None)
    if shared is None:
        raise InjectError(f"{type(model).__name__} holds no leanlora adapter; call leanlora.inject(model, config) first")
    return shared


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    return ((name, module) for name, module in model.named_modules() if isinstance(module, AdaptedLinear))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the adapter: adapted layers (base excluded), shared state, modules_to_save."""
    shared = shared_state(model)
    state: dict[str, torch.Tensor] = {}
    for name, layer in adapted_layers(model):
        own = layer.state_dict(prefix=f"{name}.")
        state.update((key, value) for key, value in own.items() if not key.startswith(f"{name}.base."))
    state.update(shared.state_dict(prefix=f"{SHARED_ATTR}."))
    for name in shared.modules_to_save_names:
        state.update(model.get_submodule(name).state_dict(prefix=f"{name}."))
    return state


def trainable_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter (unmerging first) and return the model as it was before inject."""
    shared = shared_state(model)
    for name, layer in list(adapted_layers(model)):
        layer.unmerge()
        model.set_submodule(name, layer.base.as_module())
    delattr(model, SHARED_ATTR)
    peft_methods.remove(model)
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is refresh_pieces:
            del model._forward_pre_hooks[key]
    flags = shared.original_requires_grad
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])
    return model


def merge(model: nn.Module, keep_unmerge_copy: bool = True) -> dict[str, dict[str, float]]:
    """Merge every adapter into its base; returns per-module storage error (NF4 and FP8 bases)."""
    shared_state(model)
    return {name: layer.merge(keep_unmerge_copy) for name, layer in adapted_layers(model)}


def unmerge(model: nn.Module) -> None:
    for _, layer in adapted_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and return a plain model with no leanlora modules.

    The update is added to the plain (dequantized, for NF4) weight that unload hands back, so a
    quantized base is rounded once, not requantized and dequantized again. Every update is
    computed and checked for NaN/inf before any weight changes.
    """
    from leanlora.base.dense import DenseBase
    from leanlora.layer import checked_delta, refuse_nonfinite

    refuse_nonfinite(adapter_state_dict(model).items())
    layers = list(adapted_layers(model))
    for _, layer in layers:
        layer.unmerge()
    deltas = {name: checked_delta(layer, name).detach() for name, layer in layers}
    for name, layer in layers:
        plain = layer.base.as_module()
        DenseBase(plain).add_delta_(deltas[name])
        model.set_submodule(name, plain)
    return unload(model)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model alone inside the block (the adapters stay in place)."""
    flags = {layer: layer.enabled for _, layer in adapted_layers(model)}
    for layer in flags:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, flag in flags.items():
            layer.enabled = flag
