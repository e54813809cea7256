"""Adapted layers that read the same input run their first GEMM, x A~^T, as one.

In a Llama block q, k and v read the same normalised hidden states, and so do gate and up. Each
adapted layer's first GEMM reads all of x (tokens × in) to make a narrow (tokens × b) result, its
backward reads x again for A's gradient, and it writes a (tokens × in) input gradient that
autograd then adds to the others. Against the members' A~ stacked along the rank, the same
work is one GEMM: x is read once in each direction and the input gradient is one tensor. In a
Llama block that saves three reads of x each way and three (tokens × in) gradients written and
added, for every method, since only the pieces ``(A~, B~, d, scale)`` are shared.

A set is found by name at inject: adapted children of one parent named as one of
:data:`SIBLING_NAMES` (``q_proj``/``k_proj``/``v_proj``, BERT's ``query``/``key``/``value``, ...).
The name is only a hint: the first member called with an input computes every member's narrow
result and keeps the others' until each is called with that same tensor object. A member called
with another tensor while results are waiting shows that the members read different inputs (a
decoder's cross-attention, whose k and v read the encoder's states): it computes its own, and
the set stops sharing for good, so such a set costs one wasted narrow GEMM once.

A member joins the shared GEMM when its pieces were computed for this forward by its group
(training, :mod:`leanlora.groups.stacking`), it is enabled and unmerged, and it applies no
dropout (each layer's dropout draws its own mask, which one shared GEMM cannot). Elsewhere, and
for a lone member, each layer computes its own, as before. The model's forward pre-hook
empties every set before a forward, so a result left unread (a member skipped by the model's
own code) is held for one forward at most.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# names of sibling modules that read one input in common architectures (Llama, Mistral, Qwen,
# Gemma, OPT, BERT, T5's gated FFN, Mixtral's experts)
SIBLING_NAMES = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("q", "k", "v"),
    ("wq", "wk", "wv"),
    ("wi_0", "wi_1"),
    ("w1", "w3"),
)


class SharedInput:
    """Sibling adapted layers (see the module docstring); a plain object, not a module, so it adds
    nothing to the state dict and the members stay where the model has them."""

    def __init__(self, members: list[nn.Module]) -> None:
        self.members = tuple(members)
        self.sharing = True  # False once the members were seen reading different inputs
        self.clear()

    def clear(self) -> None:
        self._input: torch.Tensor | None = None
        self._narrow: dict[int, torch.Tensor] = {}

    def __getstate__(self) -> dict:
        # results of a forward hang on its autograd graph, which deepcopy and pickle refuse
        return {"members": self.members, "sharing": self.sharing, "_input": None, "_narrow": {}}

    def narrow(self, layer: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """x A~^T for ``layer`` (unscaled, ``dtype``), through the shared GEMM; None when ``layer``
        does not take part this time (then it computes its own)."""
        if not self.sharing or not _joins(layer):
            return None
        index = self.members.index(layer)
        if self._input is not None and (self._input is not x or index not in self._narrow):
            self.sharing = False  # results wait for another input: these members read different ones
            self.clear()
            return None
        if self._input is None:
            joined = [i for i, m in enumerate(self.members) if _joins(m)]
            if len(joined) < 2:
                return None
            a = torch.cat([self.members[i].pieces[0].to(dtype) for i in joined])   # (Σ b, in)
            parts = F.linear(x.to(dtype), a).split([self.members[i].pieces[0].shape[0] for i in joined], -1)
            self._input, self._narrow = x, dict(zip(joined, parts))
        out = self._narrow.pop(index)
        if not self._narrow:
            self._input = None
        return out


def _joins(layer: nn.Module) -> bool:
    """Whether ``layer`` takes part in its set's shared GEMM in this forward."""
    return (layer.pieces is not None and layer.enabled and not layer.merged
            and (isinstance(layer.dropout, nn.Identity) or not layer.training))


def link_siblings(names: list[str], layers: list[nn.Module]) -> list[SharedInput]:
    """Give each set of sibling ``layers`` (``names``: their full names in the model) a shared
    :class:`SharedInput`; returns the sets."""
    by_parent: dict[str, dict[str, nn.Module]] = {}
    for name, layer in zip(names, layers):
        parent, _, leaf = name.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = layer
    sets = []
    for children in by_parent.values():
        for group in SIBLING_NAMES:
            members = [children[leaf] for leaf in group if leaf in children]
            if len(members) >= 2 and len({m.in_features for m in members}) == 1:
                sets.append(SharedInput(members))
                for m in members:
                    m.__dict__["siblings"] = sets[-1]
    return sets


def unlink_siblings(layers: list[nn.Module]) -> None:
    """Every layer computes its own narrow result again (for comparisons and benchmarks)."""
    for layer in layers:
        layer.__dict__["siblings"] = None
