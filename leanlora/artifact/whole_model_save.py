"""``model.save_pretrained`` on an adapted model: transformers' own save, with a warning first.

:func:`leanlora.get_model` adapts a model in place, so ``save_pretrained`` stays transformers'
method, not PEFT's: it writes the adapted model's whole state dict. That file does not load back
into a plain model: an adapted layer's weight is saved as ``<module>.base.layer.weight``, which
``from_pretrained`` does not know, and an NF4 or FP8 base (its codes are not in the state dict) is
not saved at all, so every adapted weight comes back freshly initialized. Code written for PEFT
(``model.save_pretrained(dir)`` to keep the adapter) would lose the fine-tune and the base
without an error. The save still runs, since a plain ``Trainer``'s checkpoints are this file and
resume into the same adapted model; the first call warns and names the calls that write what
the user most likely wanted.
"""

from __future__ import annotations

import warnings

from torch import nn

ATTR = "save_pretrained"


class WholeModelSave:
    """Stands in for ``model.save_pretrained`` (an instance attribute over the class's method)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.warned = False

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


def install(model: nn.Module) -> None:
    """Put the warning in front of a transformers model's ``save_pretrained`` (others: nothing)."""
    if callable(getattr(type(model), ATTR, None)):
        model.__dict__[ATTR] = WholeModelSave(model)


def remove(model: nn.Module) -> None:
    if isinstance(model.__dict__.get(ATTR), WholeModelSave):
        del model.__dict__[ATTR]
