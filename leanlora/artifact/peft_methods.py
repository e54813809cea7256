"""PEFT's model methods on an adapted model, which :func:`leanlora.get_model` does not wrap.

Code written for PEFT calls methods of the model ``get_peft_model`` returned. leanlora adapts the
model in place, so the model keeps its class, and each such method is an instance attribute that
:func:`install` sets at inject and :func:`remove` takes away at unload:

* ``save_pretrained`` stays transformers' save of the whole adapted model, with a warning first.
  That file does not load back into a plain model: an adapted layer's weight is saved as
  ``<module>.base.layer.weight``, which ``from_pretrained`` does not know, and an NF4 or FP8 base
  (its codes are not in the state dict) is not saved at all, so every adapted weight comes back
  freshly initialized. PEFT users call it to keep the adapter and would lose the fine-tune without
  an error. The save still runs, since a plain ``Trainer``'s checkpoints are this file and resume
  into the same adapted model; the first call names the calls that write what was wanted.
* ``print_trainable_parameters()``: PEFT's line, PEFT's counts (:mod:`leanlora.reports.trainable`).
* ``merge_and_unload()`` and ``unload()``: :func:`leanlora.merge_and_unload` / :func:`leanlora.unload`,
  returning the plain model.
"""

from __future__ import annotations

import warnings

from torch import nn


class _Method:
    """A method of one model, held as an instance attribute over the class's own (if any)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model


class WholeModelSave(_Method):
    """``model.save_pretrained``: transformers' save, after a warning on the first call."""

    warned = False

    def __call__(self, *args, **kwargs):
        if not self.warned:
            self.warned = True
            name = type(self.model).__name__
            warnings.warn(
                f"{name}.save_pretrained is transformers' save of the whole adapted model, not PEFT's adapter "
                "save: from_pretrained cannot load it back into a plain model (adapted weights are saved as "
                "'<module>.base.layer.weight', NF4 and FP8 bases not at all). For the adapter use "
                "leanlora.save(model, dir) or leanlora.export(model, dir, 'peft'); for a plain model with the "
                "update folded in, leanlora.export(model, dir, 'merged')", UserWarning, stacklevel=2)
        return type(self.model).save_pretrained(self.model, *args, **kwargs)


class PrintTrainableParameters(_Method):
    """``model.print_trainable_parameters()``, PEFT's line word for word."""

    def __call__(self) -> None:
        from leanlora.reports.trainable import parameter_counts

        trainable, total = parameter_counts(self.model)
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")


class MergeAndUnload(_Method):
    """``model.merge_and_unload()``: the update folded into the base weights, the plain model back.
    PEFT's ``progressbar`` and ``safe_merge`` are accepted (leanlora always checks for NaN/inf)."""

    def __call__(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        from leanlora.inject import merge_and_unload

        if adapter_names is not None:
            raise ValueError(f"adapter_names={adapter_names!r}: a leanlora model holds one adapter; call "
                             "merge_and_unload() without it")
        return merge_and_unload(self.model)


class Unload(_Method):
    """``model.unload()``: the adapters removed unmerged, the plain model back."""

    def __call__(self) -> nn.Module:
        from leanlora.inject import unload

        return unload(self.model)


METHODS = {"print_trainable_parameters": PrintTrainableParameters, "merge_and_unload": MergeAndUnload,
           "unload": Unload}


def install(model: nn.Module) -> None:
    """Set the methods on ``model``; ``save_pretrained`` only where the class has one (transformers)."""
    for name, method in METHODS.items():
        model.__dict__[name] = method(model)
    if callable(getattr(type(model), "save_pretrained", None)):
        model.__dict__["save_pretrained"] = WholeModelSave(model)


def remove(model: nn.Module) -> None:
    for name in (*METHODS, "save_pretrained"):
        if isinstance(model.__dict__.get(name), _Method):
            del model.__dict__[name]
