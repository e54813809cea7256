"""Adapted layers in groups that share stacked parameters and compute their pieces together.

At inject, layers whose strategies are the same function with other values (the same strategy
classes, parameter shapes and dtypes, plain settings and base dtype: in a Llama, q and o, k and
v, gate and up, down) form a group. Each parameter of the group is one stacked tensor (G × ...),
held by the group's *template*, a copy of the first member's strategy modules registered once in
``model.leanlora_shared.groups``; each member's strategy modules read their row of it
(:mod:`leanlora.groups.rows`). A B-LoRA Llama therefore trains a few dozen parameter tensors, not
ten per adapted layer, and torch's AdamW steps them with little host work.

In a training forward of the model (a forward pre-hook) each group computes the pieces of the
update, ``(A~, B~, d, scale)``, for all its members at once: the template runs the strategies'
own maths on the stacks, which every strategy writes over leading member dims, and each member
takes its row (``AdaptedLinear.pieces``). A B-LoRA layer's gates, quantizers and bank
composition are dozens of small operators; computed per group they are dozens per group instead
of per layer, and a handful of fused kernels when compiled (:func:`compile_pieces`).

Under FSDP2 the stacks live in the root, whose gathering pre-forward hook runs before this one,
so groups compute there too. Elsewhere the members compute their own pieces from their rows,
with the same values: in eval mode (a member may hold its own eval rank), with gradients off,
when a stack is still sharded, with re-entrant gradient checkpointing (its recompute would run the
group's backward once per block; a non-re-entrant one, transformers' default, reads the pieces of
the forward it recomputes) and under CUDA graphs (the captured step replays without the host
anyway). The pieces of the last training forward are kept until the next one, so that a
non-re-entrant recompute sees the same gate draws; calling an inner module directly in training
mode would read them: go through the model.

Pruning or finalizing a layer takes it out of its group first (:func:`ungroup`): its rows become
its own parameters again, and the group's row for it is left unused.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from leanlora.gates import priors
from leanlora.layer import AdaptedLinear

PARTS = ("factors", "ranks", "quant_a", "quant_b")
# attributes that are no setting of a strategy: nn.Module's own (but training), a name for messages,
# and the grouping itself
_NOT_SETTINGS = (frozenset(vars(nn.Module())) - {"training"}) | {"name", "_rows", "stacked"}
_PLAIN = (int, float, bool, str, type(None))


def _attr_key(value: Any) -> Any:
    """A hashable stand-in for a plain attribute; raises TypeError for a tensor held outside the registries."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_attr_key(v) for v in value)
    if isinstance(value, torch.Tensor):
        raise TypeError("plain tensor attribute")
    return ("object", id(value))  # shared holders (the bank, the sampler, the prior scale)


def signature(layer: AdaptedLinear) -> tuple | None:
    """What must be equal for two layers to share stacks; None when the layer must stay alone."""
    key = []
    for part_name in PARTS:
        for name, module in getattr(layer, part_name).named_modules(prefix=part_name):
            attrs = []
            for k, v in sorted(vars(module).items()):
                if k in _NOT_SETTINGS:
                    continue
                try:
                    attrs.append((k, _attr_key(v)))
                except TypeError:
                    return None
            tensors = tuple((n, tuple(t.shape), t.dtype, t.device, t.requires_grad)
                            for n, t in (*module._parameters.items(), *module._buffers.items()) if t is not None)
            key.append((name, type(module), tuple(attrs), tensors))
    return tuple(key)


def activation_dtype(layer: AdaptedLinear) -> torch.dtype | None:
    """The dtype the layer's adapter path runs in when its base is half precision, else None.

    :meth:`AdaptedLinear.forward` runs the adapter path in the activations' dtype when that is
    half precision; a group casts its pieces once, inside its kernels, instead of each member
    casting its own around every GEMM. Part of the grouping key.
    """
    # an FP8 base's codes are float8: its ``dtype`` is the one it computes in
    dtype = getattr(layer.base, "dtype", None) or getattr(getattr(layer.base, "weight", None), "dtype", None)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


class AdapterGroup(nn.Module):
    """The stacked strategy modules of a group, and its members (a plain list, not submodules)."""

    def __init__(self, parts: dict[str, nn.Module], cast: torch.dtype | None) -> None:
        super().__init__()
        for name, module in parts.items():
            self.add_module(name, module)
        self.cast = cast
        self.compiled = None  # set by compile_pieces

    def __getstate__(self) -> dict:
        # a copy of the model (deepcopy, pickle) compiles again
        state = self.__dict__.copy()
        state["compiled"] = None
        return state

    def pieces(self) -> tuple:
        """(A~ (G, r, in), B~ (G, out, r), d (G, r) or (r,) or None, scale) of every member in one go."""
        a, b = self.factors()
        a, b, d, scale = self.ranks.select(self.quant_a(a), self.quant_b(b))
        if self.cast is not None:
            a, b, d = a.to(self.cast), b.to(self.cast), (None if d is None else d.to(self.cast))
        return a, b, d, scale

    def does_work(self) -> bool:
        """False when the pieces are the stacks themselves (LoRA, nested ranks in float): a compiled
        call would cost more than the two views it returns."""
        from leanlora.factors.dense import DenseFactors
        from leanlora.precision.full import FullPrecision
        from leanlora.ranks.fixed import FixedRanks
        from leanlora.ranks.nested import NestedRanks

        plain = (DenseFactors, FixedRanks, NestedRanks, FullPrecision)
        return any(not isinstance(m, plain) for m in self.modules() if m is not self)

    def prior_terms(self) -> list[priors.PriorTerms]:
        """The gate priors of every member, as stacked rows (:mod:`leanlora.gates.priors`)."""
        priced = self.__dict__.get("_priced")
        if priced is None:  # the templates' modules never change: found once
            priced = self.__dict__["_priced"] = [m for m in self.modules() if m is not self and hasattr(m, "prior_terms")]
        return [t for t in (m.prior_terms() for m in priced) if t is not None]

    def extra_repr(self) -> str:
        return f"members={sum(m is not None for m in self.__dict__.get('members', ()))}"


def _stack(members: list[AdaptedLinear], shared: nn.Module) -> AdapterGroup:
    """One group: stacks of the members' parameters on a template of the first one's strategies."""
    first = members[0]
    memo: dict[int, Any] = {id(m): m for m in shared.modules()}
    memo[id(shared.prior_scale)] = shared.prior_scale
    places = []  # (part path, parameter name)
    for part in PARTS:
        for path, module in getattr(first, part).named_modules(prefix=part):
            for name, p in module._parameters.items():
                if p is None:
                    continue
                with torch.no_grad():
                    rows = [m.get_submodule(path)._parameters[name] for m in members]
                    memo[id(p)] = nn.Parameter(torch.stack(rows), requires_grad=p.requires_grad)
                places.append((path, name))
    template = {part: copy.deepcopy(getattr(first, part), memo) for part in PARTS}
    group = AdapterGroup(template, activation_dtype(first))
    for module in group.modules():
        if module is not group:
            module.stacked = True
    group.__dict__["members"] = list(members)
    for index, layer in enumerate(members):
        for path, name in places:
            module = layer.get_submodule(path)
            del module._parameters[name]
            module.__dict__.setdefault("_rows", {})[name] = (group.get_submodule(path), index)
        layer.__dict__["group"], layer.__dict__["group_index"] = group, index
    return group


def form_groups(layers: list[AdaptedLinear], shared: nn.Module) -> None:
    """Group ``layers`` (model order kept inside each group) and stack their parameters."""
    by_key: dict[tuple, list[AdaptedLinear]] = {}
    for layer in layers:
        key = signature(layer)
        if key is not None:
            by_key.setdefault((key, activation_dtype(layer)), []).append(layer)
    for members in by_key.values():
        group = _stack(members, shared)
        group.__dict__["owner"] = shared.groups  # to leave it once its last member has
        shared.groups.append(group)


@torch.no_grad()
def ungroup(layer: AdaptedLinear) -> None:
    """Give ``layer`` its rows back as parameters of its own and take it out of its group."""
    group = layer.__dict__.get("group")
    if group is None:
        return
    for part in PARTS:
        for module in getattr(layer, part).modules():
            rows = module.__dict__.pop("_rows", None)
            for name, (template, row) in (rows or {}).items():
                stack = getattr(template, name)
                module._parameters[name] = nn.Parameter(stack.detach()[row].clone(), requires_grad=stack.requires_grad)
    group.members[layer.group_index] = None
    layer.__dict__["group"], layer.__dict__["pieces"] = None, None
    owner = group.__dict__["owner"]  # set by form_groups, which made the group
    if all(m is None for m in group.members):  # no row is read any more
        del owner[next(i for i, g in enumerate(owner) if g is group)]


def ungroup_all(shared: nn.Module) -> None:
    """Every layer on parameters of its own (finalize: each layer keeps its own ranks and bits)."""
    for group in list(shared.groups):
        for layer in list(group.members):
            if layer is not None:
                ungroup(layer)
    del shared.groups[:]


def row_names(shared: nn.Module) -> dict[int, list[str | None]]:
    """id(stacked parameter) -> the name each row has in the state dict (None for an unused row)."""
    return {id(stack): [None if m is None else f"{m.name}.{key}" for m in group.members]
            for group in shared.groups for key, stack in group.named_parameters()}


def _split(outs: tuple, size: int) -> list[tuple]:
    """Per-member (A~, B~, d, scale) from a group's stacked pieces."""
    a, b, d, scale = outs

    def rows(t):
        if isinstance(t, torch.Tensor) and t.dim() == (a.dim() - 1):   # (G, r): one row each
            return t.unbind(0)
        return (t,) * size                                           # shared by every member
    return list(zip(a.unbind(0), b.unbind(0), rows(d), rows(scale)))


def _grouped_forward(model: nn.Module, shared: nn.Module) -> bool:
    """Whether this forward computes its pieces by group (see the module docstring)."""
    if not (model.training and torch.is_grad_enabled()) or shared.off_for_graphs or not shared.groups \
            or shared.config.vectorize == "never":
        return False
    if any(m.__dict__.get("gradient_checkpointing") is True and _reentrant(m)
           for m in shared.__dict__.get("checkpointable", ())):
        _warn_reentrant_once(shared)
        return False
    stack = next(shared.groups[0].parameters(), None)
    return stack is None or type(stack) in (torch.Tensor, nn.Parameter)  # a DTensor: sharded (FSDP2)


def _warn_reentrant_once(shared: nn.Module) -> None:
    """Say once why a re-entrantly checkpointed model trains slower, where the groups have work to share."""
    if shared.__dict__.get("reentrant_checked"):
        return
    shared.__dict__["reentrant_checked"] = True  # decided once: this runs in every training forward
    if any(g.does_work() for g in shared.groups):
        warnings.warn("leanlora: re-entrant gradient checkpointing has each adapted layer compute its own gates, "
                      "quantizers or bank composition instead of one computation per group of layers, several "
                      "times slower; enable it with gradient_checkpointing_kwargs={'use_reentrant': False} (the "
                      "same gradients, the grouped path)", RuntimeWarning, stacklevel=2)


def _reentrant(block: nn.Module) -> bool:
    """Whether a checkpointed block recomputes re-entrantly: unless its checkpoint function says
    ``use_reentrant=False`` (Hugging Face's default in transformers 5), assume it does."""
    fn = block.__dict__.get("_gradient_checkpointing_func")
    return getattr(fn, "keywords", {}).get("use_reentrant", True) is not False


@torch.compiler.disable
def refresh_pieces(model: nn.Module, args: tuple) -> None:
    """Forward pre-hook of the adapted model (module-level, so the hook survives deepcopy and pickle)."""
    shared = getattr(model, "leanlora_shared", None)
    if shared is None:
        return
    for siblings in shared.__dict__.get("sibling_sets", ()):
        siblings.clear()
    for group in shared.groups:
        for layer in group.members:
            if layer is not None:
                layer.__dict__["pieces"] = None  # a plain attribute: skip nn.Module.__setattr__'s checks
    if not _grouped_forward(model, shared):
        return
    with torch.profiler.record_function("leanlora: group pieces"):
        for group in shared.groups:  # each has a member left: ungroup drops a group with its last one
            first = next(m for m in group.members if m is not None)
            group.cast = activation_dtype(first)  # the base may have been cast since inject
        compiled = tuple(g for g in shared.groups if g.compiled is not None)
        done = dict(zip(map(id, compiled), _run(compiled, shared))) if compiled else {}
        for group in shared.groups:
            outs = done.get(id(group)) or group.pieces()
            for layer, pieces in zip(group.members, _split(outs, len(group.members))):
                if layer is not None:
                    layer.__dict__["pieces"] = pieces


def _pieces_of(groups: tuple[AdapterGroup, ...]) -> tuple:
    return tuple(g.pieces() for g in groups)


def _run(groups: tuple[AdapterGroup, ...], shared: nn.Module) -> tuple:
    """Every compiled group's pieces in one compiled call: one graph, one autograd node for all."""
    try:
        return groups[0].compiled(groups)
    except Exception as err:
        from leanlora.train.compile_errors import is_compile_error, root_cause

        if not is_compile_error(err):
            raise
        warnings.warn(f"leanlora: compiling the grouped adapter pieces failed ({root_cause(err)}); "
                      "they are computed eagerly", RuntimeWarning, stacklevel=3)
        for other in shared.groups:
            other.compiled = None
        return _pieces_of(groups)


def compile_pieces(model: nn.Module, compile_mode: str | None = "default", backend="inductor") -> None:
    """Compile the pieces of every group that computes any (``None``: eager again) as one function,
    so that a step pays one compiled call and one backward node for all groups; the compiled
    training path calls this.

    Under CUDA graphs ("reduce-overhead") the members compute their own pieces instead: grouped
    pieces would be graph inputs whose gradients outlive the layer graphs that produce them,
    which CUDA-graph trees answer by recording again at every step.
    """
    shared = getattr(model, "leanlora_shared", None)
    if shared is None:
        return
    shared.off_for_graphs = compile_mode == "reduce-overhead"
    fn = None if compile_mode is None else torch.compile(_pieces_of, backend=backend, fullgraph=True, dynamic=False)
    for group in shared.groups:
        group.compiled = fn if group.does_work() else None
