"""``model.modules()``, remembered between steps and checked against the tree instead of walked.

Three things run over every module of the model at every training step: :func:`leanlora.advance`
(the schedules), :func:`leanlora.regularizer` (the priors) and the grouped pieces' pre-hook
(:mod:`leanlora.speed.vectorize`). A walk costs a Python frame per module, and a B-LoRA model of a
billion parameters has over a thousand modules; on a GPU that outruns its host that cost paces
the step. The tree rarely changes, so each walk's result is kept with a flat record of the tree
it came from: every module's child registry, its size, and the child under
each key. Checking that record is three passes of ``map`` without recursion, generators or name strings;
a module added, removed or replaced anywhere fails it, and the next walk is taken afresh.
"""

from __future__ import annotations

import weakref
from operator import attrgetter, is_
from typing import Callable

from torch import nn

_registry_of = attrgetter("_modules")


class _Snapshot:
    """The modules of one root in ``nn.Module.modules()`` order, and the tree they were read from."""

    def __init__(self, root: nn.Module) -> None:
        self.modules: list[nn.Module] = []
        registries, sizes, edge_registries, keys, children = [], [], [], [], []
        seen: set[int] = set()
        todo = [root]
        while todo:  # pre-order, children in registration order, each module once: modules()'s order
            module = todo.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            self.modules.append(module)
            registry = module._modules
            registries.append(registry)
            sizes.append(len(registry))
            for k, child in registry.items():
                edge_registries.append(registry)
                keys.append(k)
                children.append(child)
            todo.extend(reversed([c for c in registry.values() if c is not None]))
        self.registries, self.sizes = registries, sizes
        self.edges = (edge_registries, keys, children)
        self.selections: dict[str, list] = {}

    def holds(self) -> bool:
        # map() over C-level callables: no Python frame per module, as a generator expression would cost
        if not all(map(is_, map(_registry_of, self.modules), self.registries)):
            return False                                          # a registry swapped
        if list(map(len, self.registries)) != self.sizes:
            return False                                          # a child added or removed
        edge_registries, keys, children = self.edges
        return all(map(is_, map(dict.get, edge_registries, keys), children))  # a child replaced


class ModuleIndex:
    """Per-root snapshots; :meth:`modules` and :meth:`select` answer from them while the tree holds."""

    def __init__(self) -> None:
        self._snapshots: dict[int, tuple[weakref.ref, _Snapshot]] = {}

    def __getstate__(self) -> dict:
        return {"_snapshots": {}}  # a copied model walks its own tree

    def _snapshot(self, root: nn.Module) -> _Snapshot:
        entry = self._snapshots.get(id(root))
        if entry is not None and entry[0]() is root and entry[1].holds():
            return entry[1]
        if len(self._snapshots) > 8:  # roots come and go (wrappers, copies): keep only live ones
            self._snapshots = {k: v for k, v in self._snapshots.items() if v[0]() is not None}
        snapshot = _Snapshot(root)
        self._snapshots[id(root)] = (weakref.ref(root), snapshot)
        return snapshot

    def modules(self, root: nn.Module) -> list[nn.Module]:
        """What ``list(root.modules())`` would return now (do not change the list)."""
        return self._snapshot(root).modules

    def select(self, root: nn.Module, key: str, keep: Callable[[nn.Module], bool]) -> list[nn.Module]:
        """The modules of ``root`` for which ``keep`` holds, in order, kept under ``key``.

        ``keep`` must depend on what a module is (its class, its place), not on state that changes
        while the tree stays the same: the answer is computed once per tree.
        """
        snapshot = self._snapshot(root)
        chosen = snapshot.selections.get(key)
        if chosen is None:
            chosen = snapshot.selections[key] = [m for m in snapshot.modules if keep(m)]
        return chosen
