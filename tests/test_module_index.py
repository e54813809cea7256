"""ModuleIndex answers what model.modules() would, and notices every change of the tree."""

import copy

import pytest
import torch
from torch import nn

from leanlora.speed.module_index import ModuleIndex


def tree() -> nn.Module:
    shared = nn.Linear(2, 2)
    root = nn.Sequential(nn.Linear(2, 3), nn.ModuleList([nn.ReLU(), shared, nn.Sequential(shared, nn.Tanh())]),
                         nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Identity()}))
    root.add_module("empty", None)
    return root


def test_same_modules_in_the_same_order_as_modules_each_once():
    root = tree()
    index = ModuleIndex()
    assert index.modules(root) == list(root.modules())
    assert len(index.modules(root)) == len({id(m) for m in index.modules(root)})


@pytest.mark.parametrize("change", [
    lambda r: r[1].append(nn.GELU()),                      # added
    lambda r: r[2].pop("a"),                               # removed from a registry directly
    lambda r: delattr(r, "0"),                             # deleted attribute
    lambda r: setattr(r[1], "0", nn.SiLU()),               # replaced
    lambda r: r[1][2].add_module("new", nn.Linear(1, 1)),  # added deep down
    lambda r: r.add_module("empty", nn.Linear(1, 1)),      # a None slot filled
    lambda r: setattr(r[2], "_modules", {}),               # the registry itself swapped
])
def test_every_change_of_the_tree_is_seen(change):
    root = tree()
    index = ModuleIndex()
    before = index.modules(root)
    assert index.modules(root) is before  # unchanged tree: the remembered list
    change(root)
    assert index.modules(root) == list(root.modules())


def test_select_is_computed_once_per_tree_and_again_after_a_change():
    root = tree()
    index = ModuleIndex()
    calls = []

    def keep(m):
        calls.append(m)
        return isinstance(m, nn.Linear)

    linears = index.select(root, "linears", keep)
    assert linears == [m for m in root.modules() if isinstance(m, nn.Linear)]
    n = len(calls)
    assert index.select(root, "linears", keep) is linears and len(calls) == n
    root[1].append(nn.Linear(4, 4))
    assert index.select(root, "linears", keep) == [m for m in root.modules() if isinstance(m, nn.Linear)]
    assert len(calls) > n


def test_roots_are_kept_apart_and_a_copy_walks_its_own_tree():
    a, b = tree(), tree()
    index = ModuleIndex()
    assert index.modules(a) == list(a.modules()) and index.modules(b) == list(b.modules())
    holder = nn.Module()
    holder.index = index
    holder.child = a
    index.modules(holder)
    twin = copy.deepcopy(holder)
    assert twin.index.modules(twin) == list(twin.modules())
    assert all(m is not n for m, n in zip(twin.index.modules(twin), holder.modules()))


def test_regularizer_and_advance_follow_a_changed_tree():
    """A gated layer taken out after a step no longer adds its prior (no stale list of modules)."""
    import leanlora
    from leanlora import AdapterConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    leanlora.inject(model, AdapterConfig(r=2, ranks="gated", target_modules=["0", "1"]))
    leanlora.advance(model, 0)
    both = leanlora.regularizer(model)
    model[1] = nn.Linear(8, 8)  # the second adapted layer replaced by a plain one
    leanlora.advance(model, 1)
    one = leanlora.regularizer(model)
    assert 0 < one < both
    assert one.item() == pytest.approx(both.item() / 2, rel=1e-5)  # same shapes, same initial gates


def test_the_vectorizer_checks_the_same_index_as_advance_and_regularizer_also_in_a_copy():
    import leanlora
    from conftest import tiny_llama

    model = leanlora.inject(tiny_llama(), leanlora.AdapterConfig(r=4, ranks="gated", target_modules=("q_proj", "v_proj")))
    shared = model.leanlora_shared
    assert shared.vectorizer._index is shared.module_index
    twin = copy.deepcopy(model).leanlora_shared
    assert twin.vectorizer._index is twin.module_index and twin.module_index is not shared.module_index
