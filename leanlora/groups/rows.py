"""A strategy module whose parameters may be rows of a stack that its layer's group owns.

Layers of one shape and strategy keep each parameter stacked, one (G, ...) tensor per name, on
their group's template modules (:mod:`leanlora.groups`). A member's strategy module keeps
everything that is its own (its bits, its ranks, its finalize), but no parameter: reading
``module.lora_A`` gives its row of the stack, with gradient, and its state dict lists that row
under the parameter's own name, so that adapters on disk stay per module and loading one writes
into the row. Once a layer leaves its group (:func:`leanlora.groups.ungroup`) the rows become
parameters of its own again.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


class StackedRows:
    """Mixin of every strategy module (put it before ``nn.Module`` in the bases).

    ``stacked`` is True on a group's templates: their parameters are the stacks, with the group's
    members along dim 0, and the strategy's maths runs over that leading dim (per-member
    reductions such as a quantizer's range keep it). ``_rows`` maps a member's parameter names to
    (template module, row).
    """

    stacked = False

    def __getattr__(self, name: str):  # every parameter read of a strategy module comes here
        rows = self.__dict__.get("_rows")
        hit = rows.get(name) if rows else None
        if hit is not None:
            return getattr(hit[0], name)[hit[1]]
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        if name in (self.__dict__.get("_rows") or {}):
            raise AttributeError(f"{type(self).__name__}.{name} is a row of its group's stacked parameter; "
                                 "take the layer out of its group first (leanlora.groups.ungroup)")
        super().__setattr__(name, value)

    def member_dims(self, t: torch.Tensor) -> tuple[int, ...]:
        """The dims of ``t`` that belong to one member: all of them, or all but the leading one on a template."""
        return tuple(range(1 if self.stacked else 0, t.dim()))

    def per_member(self, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``value`` (one number per member: () or (G,)) shaped to broadcast against ``like``."""
        return value.reshape(value.shape + (1,) * (like.dim() - value.dim()))

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        if self.stacked:  # the members list the rows: the state dict stays per module
            return
        for name, (template, row) in (self.__dict__.get("_rows") or {}).items():
            stack = getattr(template, name)
            destination[prefix + name] = stack[row] if keep_vars else stack.detach()[row]
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        if self.stacked:  # written through the members' rows
            return
        rows = self.__dict__.get("_rows") or {}
        for name, (template, row) in rows.items():
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            target = getattr(template, name).detach()[row]
            value = state_dict[key]
            if tuple(value.shape) != tuple(target.shape):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                                  f"the shape in current model is {tuple(target.shape)}.")
                continue
            with torch.no_grad():
                target.copy_(value)
        if rows:
            state_dict = {k: v for k, v in state_dict.items()
                          if not (k.startswith(prefix) and k[len(prefix):] in rows)}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def stack_holders(module: nn.Module) -> list[nn.Module]:
    """The group templates whose stacks ``module``'s rows belong to (none once it holds its own)."""
    return list({id(t): t for t, _ in (module.__dict__.get("_rows") or {}).values()}.values())


def row_of(module: nn.Module, name: str) -> tuple[nn.Module, int | None]:
    """Where ``module.<name>`` is held: (its group's template, its row), or (``module``, None) for a
    parameter of its own."""
    hit = (module.__dict__.get("_rows") or {}).get(name)
    return (module, None) if hit is None else hit


def row_grad(module: nn.Module, name: str) -> torch.Tensor | None:
    """The gradient of ``module.<name>``: its row of the stack's gradient, or its own parameter's."""
    holder, row = row_of(module, name)
    grad = getattr(holder, name).grad
    return grad if grad is None or row is None else grad[row]


def row_parameters(module: nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every trainable tensor of ``module`` and its children: rows, then own parameters."""
    for name, m in module.named_modules(prefix=prefix):
        for key, (template, row) in (m.__dict__.get("_rows") or {}).items():
            yield f"{name}.{key}", getattr(template, key)[row]
        yield from ((f"{name}.{key}", p) for key, p in m._parameters.items() if p is not None)
