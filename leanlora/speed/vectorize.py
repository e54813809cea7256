"""The adapter pieces of many layers, computed together once per forward (``AdapterConfig.vectorize``).

B-LoRA's gates and quantizers, and VB-LoRA's bank composition, are dozens of operators on small
tensors per adapted layer. Layer by layer that is dozens of extra kernels per module in a
compiled training step, each launched from the host, so on a fast GPU the step waits on its
host. But the work is the same function for every layer of the
same shape and strategy (q and o, k and v, gate and up, down: four groups in a Llama), only with
other parameter values. So at the start of the model's forward, each such group is computed in
one go: its parameters are stacked and ``torch.func.vmap`` runs the layers' own
:meth:`~leanlora.layer.AdaptedLinear.lowrank` over the stack (gate draws differ per layer:
``randomness="different"``). Each layer then reads its slice (``AdaptedLinear.pieces``) instead
of computing its own. Same values and the same gradients as layer by layer (tested); the gate
samples come from another stream of random numbers. The group's gate prior is evaluated in the
same function, from the gate rows already stacked; :func:`leanlora.regularizer` uses it (and
walks only the other modules) until the backward reaches those gates.

A group is what vmap may batch: layers whose strategy modules have the same classes, the same
parameter and buffer shapes and the same plain attributes (module names aside). Anything vmap
cannot prove identical (a tensor held as a plain attribute) keeps a layer to itself.

When it is on: in training mode with gradients enabled, at every forward of the model
``inject`` was given (a forward pre-hook), in "auto" only for layers whose pieces take work
(gated ranks, fixed or learned bits, bank factors; plain LoRA factors are the parameters
themselves, and stacking them would only copy; a model with no such layer gets no hook at all,
so LoRA, DyLoRA and QDyLoRA pay nothing per step). It stays off, layer by layer as before, under
FSDP2 (sharded parameters exist whole only inside each layer's own forward) and with Hugging
Face gradient checkpointing (a re-entrant recompute would run the shared backward once per layer).
The pieces of the last training forward are kept until the next forward of the model, so that a
non-re-entrant recompute sees the same gate draws; in eval mode, or with gradients off, they are
dropped. Calling an inner module directly, bypassing the model's forward, in training mode would
read the last forward's pieces: go through the model. The grouped parameters get their gradients
from ``backward()`` (a hook hands each its slice of the group's); ``torch.autograd.grad(loss,
parameters)`` does not reach them outside torch.distributed: use ``vectorize='never'`` there.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import nn

from leanlora.gates import priors
from leanlora.speed.compile_errors import is_compile_error, root_cause
from leanlora.factors.dense import DenseFactors
from leanlora.layer import AdaptedLinear
from leanlora.speed.module_index import ModuleIndex
from leanlora.precision.fixed import FrozenBits
from leanlora.precision.full import FullPrecision
from leanlora.ranks.fixed import FixedRanks
from leanlora.ranks.nested import NestedRanks

_PARTS = ("factors", "ranks", "quant_a", "quant_b")
_MODULE_INTERNALS = frozenset(vars(nn.Module())) - {"training"}
_IGNORED_ATTRS = frozenset({"name"})  # messages only
_PLAIN = (int, float, bool, str, type(None))
# strategies whose share of lowrank is handing back parameters or a mask: grouping them only copies
_WORKLESS = (DenseFactors, FixedRanks, NestedRanks, FullPrecision, FrozenBits)

MODES = ("auto", "always", "never")


class _Pieces(nn.Module):
    """A layer's :meth:`lowrank` as a module forward, so that ``functional_call`` can swap its tensors."""

    def __init__(self, layer: AdaptedLinear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self):
        return self.layer.lowrank()


def _attr_key(value: Any) -> Any:
    """A hashable stand-in for a plain attribute; raises TypeError for a tensor vmap would not see."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_attr_key(v) for v in value)
    if isinstance(value, torch.Tensor):
        raise TypeError("plain tensor attribute")
    return ("object", id(value))  # shared holders (the bank, the sampler, the prior scale)


def signature(layer: AdaptedLinear) -> tuple | None:
    """What must be equal for two layers to share one vmap; None when the layer cannot be batched."""
    key = []
    for part_name in _PARTS:
        part = getattr(layer, part_name)
        for name, module in part.named_modules(prefix=part_name):
            attrs = []
            for k, v in sorted(vars(module).items()):
                if k in _MODULE_INTERNALS or k in _IGNORED_ATTRS:
                    continue
                try:
                    attrs.append((k, _attr_key(v)))
                except TypeError:
                    return None
            tensors = tuple((n, tuple(t.shape), t.dtype, t.device, t.requires_grad)
                            for n, t in (*module._parameters.items(), *module._buffers.items()) if t is not None)
            key.append((name, type(module), tuple(attrs), tensors))
    return tuple(key)


def wanted(layers: list[AdaptedLinear], mode: str) -> bool:
    """Whether a model of these layers needs the forward pre-hook at all (LoRA in "auto" does not)."""
    return mode == "always" or (mode == "auto" and any(worth_batching(layer) for layer in layers))


def worth_batching(layer: AdaptedLinear) -> bool:
    """True when the layer's pieces are computed (gates, quantizers, a bank), not just its parameters."""
    return any(not isinstance(m, _WORKLESS) for part in _PARTS for m in getattr(layer, part).modules())


def groups(layers: list[AdaptedLinear], mode: str) -> list[list[AdaptedLinear]]:
    """Layers in batchable groups of two or more (model order kept inside each group)."""
    by_key: dict[tuple, list[AdaptedLinear]] = {}
    for layer in layers:
        if layer.merged or not layer.enabled or (mode == "auto" and not worth_batching(layer)):
            continue
        key = signature(layer)
        if key is not None:  # the pieces are cast for the base, so one group, one base dtype
            by_key.setdefault((key, activation_dtype(layer)), []).append(layer)
    return [members for members in by_key.values() if len(members) > 1]


class _Slots:
    """Where a layer's strategy tensors live, so that each step reads them without walking modules.

    Walking the strategy modules and naming each of a layer's tensors at every training forward
    costs a Python frame per module and a string per tensor; reading them from the registries
    they were found in costs neither. :meth:`read` answers None when the modules changed shape (a strategy module replaced, a
    tensor added or removed), and the grouping is then built again.
    """

    def __init__(self, layer: AdaptedLinear) -> None:
        self.names: list[str] = []
        self.places: list[tuple[dict, str]] = []          # (registry, key)
        self.edges: list[tuple[dict, str, nn.Module]] = []  # (parent's _modules, key, child)
        self.sizes: list[tuple[dict, int]] = []
        todo = [(f"layer.{p}", layer._modules, p) for p in _PARTS]
        while todo:
            prefix, parent, key = todo.pop()
            module = parent[key]
            self.edges.append((parent, key, module))
            if module is None:
                continue
            for registry in (module._parameters, module._buffers):
                self.sizes.append((registry, len(registry)))
                for k, t in registry.items():
                    if t is not None:
                        self.names.append(f"{prefix}.{k}")
                        self.places.append((registry, k))
            todo.extend((f"{prefix}.{k}", module._modules, k) for k in module._modules)

    def read(self) -> list[torch.Tensor] | None:
        if any(parent.get(key) is not child for parent, key, child in self.edges) or \
                any(len(registry) != n for registry, n in self.sizes):
            return None
        tensors = [registry[k] for registry, k in self.places]
        return None if any(t is None for t in tensors) else tensors


def activation_dtype(layer: AdaptedLinear) -> torch.dtype | None:
    """The dtype the layer's adapter path will run in when its base says so (bf16/fp16 weights), else None.

    :meth:`AdaptedLinear.forward` runs the adapter path in the activations' dtype when that is
    half precision; the activations of a bf16 layer are bf16, so the group casts A~, B~ and d
    to it once, inside its fused kernels, instead of each layer launching its own casts (and
    their backward) around every GEMM: a few launches per group instead of per layer.
    """
    # an FP8 base's codes are float8: its ``dtype`` is the one it computes in
    dtype = getattr(layer.base, "dtype", None) or getattr(getattr(layer.base, "weight", None), "dtype", None)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def _flags(layer: AdaptedLinear) -> tuple:
    return layer.training, layer.merged, layer.enabled, activation_dtype(layer)


def batched_lowrank(template: _Pieces, stacked: dict[str, torch.Tensor], prior_plan: tuple = (),
                    prior_weights: tuple = (), cast: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """The tensors of the group's pieces, each with a leading member dimension: A~, B~, [d], [scale],
    then, when ``prior_plan`` names gate tensors, the group's prior (a scalar). A~, B~ and d come
    in ``cast`` when given (:func:`activation_dtype`): the same values the layers' own casts make.

    d and scale appear when the template's own lowrank returns them as tensors (:func:`layout`).
    The prior of each planned gate tensor is :func:`leanlora.gates.priors.evaluate` over the stacked
    rows, (stacked key, chain) in ``prior_plan`` and the prices in ``prior_weights``: computed here
    it fuses with the pieces, and the stacked gates' gradient from pieces and prior is summed
    before it is split among the members (instead of one more addition per gate tensor).
    A pure function of its inputs, so that ``torch.compile`` can take it whole (``fullgraph``).
    """
    def one(state):
        a, b, d, scale = torch.func.functional_call(template, state, ())
        if cast is not None:
            a, b, d = a.to(cast), b.to(cast), (d.to(cast) if d is not None else None)
        return (a, b) + ((d,) if d is not None else ()) + ((scale,) if isinstance(scale, torch.Tensor) else ())

    outs = torch.func.vmap(one, randomness="different")(stacked)
    if prior_plan:
        terms = [(priors.open_probs(stacked[key], chain) * w).sum() for (key, chain), w in zip(prior_plan, prior_weights)]
        outs = outs + (torch.stack(terms).sum(),)
    return outs


@torch.no_grad()
def layout(layer: AdaptedLinear) -> tuple[bool, float | None]:
    """(whether lowrank returns d, the scale when it is a plain number) for the layer's group.

    Found by running the layer's lowrank once, with the random state put back afterwards: the
    gate draws of the step must not depend on whether the grouping was just rebuilt.
    """
    device = next((t.device for t in _Slots(layer).read() or ()), torch.device("cpu"))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        _, _, d, scale = layer.lowrank()
    return d is not None, (None if isinstance(scale, torch.Tensor) else scale)


def split(outs: tuple[torch.Tensor, ...], shape: tuple[bool, float | None]) -> list[tuple]:
    """Per-member (A~, B~, d, scale) from the stacked outputs of :func:`batched_lowrank`."""
    has_d, plain_scale = shape
    pieces = []
    for item in zip(*(t.unbind(0) for t in outs)):   # one backward node per output, not per member
        a, b, rest = item[0], item[1], list(item[2:])
        d = rest.pop(0) if has_d else None
        pieces.append((a, b, d, rest.pop(0) if plain_scale is None else plain_scale))
    return pieces


def _sharded(layer: AdaptedLinear) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build without distributed
        return False
    return any(isinstance(p, DTensor) for p in layer.factors.parameters())


class _Group:
    """One group's members (indices into the layer list) and what computing it needs each step."""

    def __init__(self, members: list[int], layers: list[AdaptedLinear]) -> None:
        self.members = members
        first = layers[members[0]]
        self.layout = layout(first)           # from one eager lowrank of its first member
        self.template = _Pieces(first)
        self.cast = activation_dtype(first)   # every member's: part of the grouping key
        # gate tensors whose prior can be evaluated on the stacked rows: the strategy modules of
        # the first member that state their prior as data, and the same module of every member
        self.priced: list[tuple[str, nn.Module, frozenset[int]]] = []
        for part in _PARTS:
            for name, module in getattr(first, part).named_modules(prefix=f"layer.{part}"):
                if hasattr(module, "prior_terms"):
                    path = name.removeprefix("layer.")
                    member_ids = frozenset(id(layers[i].get_submodule(path)) for i in members)
                    self.priced.append((name, module, member_ids))

    def prior_plan(self, stacked: dict[str, torch.Tensor]) -> tuple[tuple, tuple, frozenset[int]]:
        """(stacked keys and chains, price rows, ids of the member modules covered) for this step.

        Members of a group have equal plain attributes (their signature), so the first member's
        prices are every member's; the prices are read each step (they follow the model-wide scale).
        """
        plan, weights, covered = [], [], frozenset()
        for name, module, member_ids in self.priced:
            terms = module.prior_terms()
            key = next((f"{name}.{k}" for k, v in module._parameters.items() if v is terms.log_alpha), None) \
                if terms is not None else None
            if key is None or key not in stacked:
                continue
            t = stacked[key]
            plan.append((key, terms.chain))
            weights.append(priors.price_row(terms.weights, t.dtype, t.device))
            covered |= member_ids
        return tuple(plan), tuple(weights), covered


class Vectorizer:
    """Computes every group's pieces at the model's forward; remembers the grouping and failures.

    It also evaluates the gate prior of the grouped layers with their pieces (``pending_prior``,
    read by :func:`leanlora.regularizer` until the backward reaches those gates).
    """

    def __init__(self, mode: str, index: ModuleIndex | None = None) -> None:
        """``index``: the model's :class:`ModuleIndex`, shared with advance and regularizer (one
        record of the tree, checked by each); a fresh one when not given."""
        if mode not in MODES:
            raise ValueError(f"vectorize={mode!r} is invalid: allowed {MODES}")
        self.mode = mode
        self.failed: set[tuple] = set()
        self.batched = batched_lowrank
        self.off_for_graphs = False
        self.pending_prior: tuple[weakref.ref, list[torch.Tensor], frozenset[int]] | None = None
        self._layers: list[AdaptedLinear] = []
        self._slots: list[_Slots] = []
        self._seen: list[tuple] = []   # per layer: its flags and the ids of its tensors
        self._groups: list[_Group] = []
        self._index = index if index is not None else ModuleIndex()

    def __getstate__(self) -> dict:
        # a copy of the model (deepcopy, pickle) regroups its own layers and compiles again
        state = self.__dict__.copy()
        state.update(_layers=[], _slots=[], _seen=[], _groups=[], batched=batched_lowrank, pending_prior=None)
        return state

    def use_compiler(self, compile_mode: str | None, backend="inductor") -> None:
        """Compile the grouped computation (``None``: eager again); the compiled training path calls
        this. Eager vmap runs each operator through functorch's batching layer from Python, host
        time per operator and per step; compiled, each group is a few fused kernels.

        Under CUDA graphs ("reduce-overhead") the layers compute their own pieces instead: the
        graphs replay without the host anyway, and grouped pieces would be graph inputs whose
        gradients outlive the layer graphs that produce them, which CUDA-graph trees answer by
        recording again at every step, far slower than computing layer by layer.
        """
        self.off_for_graphs = compile_mode == "reduce-overhead"
        if compile_mode is None:
            self.batched = batched_lowrank
        else:
            self.batched = torch.compile(batched_lowrank, backend=backend, fullgraph=True, dynamic=False)

    def _current(self, layers: list[AdaptedLinear]) -> list[list[torch.Tensor]] | None:
        """Each layer's tensors when nothing that decides the grouping changed since the last forward.

        A parameter replaced (pruning, finalizing, loading) is a new object, so its id changes; a
        tensor changed in place (``.data = ...``) keeps its id, and then stacking fails or
        recompiles (:meth:`refresh` groups afresh on a failure).
        """
        if len(layers) != len(self._layers) or any(a is not b for a, b in zip(layers, self._layers)):
            return None
        out = []
        for layer, slots, seen in zip(layers, self._slots, self._seen):
            tensors = slots.read()
            if tensors is None or seen != (_flags(layer), tuple(map(id, tensors))):
                return None
            out.append(tensors)
        return out

    def _regroup(self, layers: list[AdaptedLinear]) -> list[list[torch.Tensor]]:
        self._layers, self._slots = layers, [_Slots(layer) for layer in layers]
        tensors = [slots.read() for slots in self._slots]
        self._seen = [(_flags(layer), tuple(map(id, t))) for layer, t in zip(layers, tensors)]
        index = {id(layer): i for i, layer in enumerate(layers)}
        self._groups = [_Group([index[id(m)] for m in members], layers) for members in groups(layers, self.mode)]
        return tensors

    def _stack(self, tensors: list[list[torch.Tensor]]) -> list[dict[str, torch.Tensor] | None]:
        """Each group's tensors stacked by name; each parameter gets its slice of the stack's gradient.

        Done eagerly, outside the compiled part: a compiled function guards on every tensor it is
        given, and a group of 32 layers holds over 500 of them; stacked, there are a dozen.

        The stacks are new leaves, and a hook hands each member its slice once the stack's
        gradient is in (:func:`_hand_out`): a differentiable ``torch.stack`` would put a stack
        node and an accumulation node per parameter into every backward (ten per adapted layer
        for B-LoRA), which the autograd engine runs one by one from the host. With torch.distributed running, the stack stays
        differentiable: DDP learns that a gradient is ready from each parameter's own
        accumulation node.
        """
        differentiable = torch.distributed.is_available() and torch.distributed.is_initialized()
        out = []
        for group in self._groups:
            if self.failed and signature(self._layers[group.members[0]]) in self.failed:
                out.append(None)
                continue
            names = self._slots[group.members[0]].names
            stacks = {}
            for j, n in enumerate(names):
                members = [tensors[i][j] for i in group.members]
                if differentiable or not members[0].requires_grad:
                    stacks[n] = torch.stack(members)
                    continue
                with torch.no_grad():
                    stack = torch.stack(members)
                stack.requires_grad_(True)
                stack.register_post_accumulate_grad_hook(_hand_out(members))
                stacks[n] = stack
            out.append(stacks)
        return out

    def refresh(self, model: nn.Module) -> None:
        self.pending_prior = None
        layers = self._index.select(model, "layers", lambda m: isinstance(m, AdaptedLinear))
        for layer in layers:
            layer.__dict__["pieces"] = None  # a plain attribute: skip nn.Module.__setattr__'s checks
        # whether any block recomputes its forward (Hugging Face sets the flag on the modules that have it)
        checkpointed = any(m.__dict__.get("gradient_checkpointing") is True for m in
                           self._index.select(model, "checkpointing", lambda m: hasattr(m, "gradient_checkpointing")))
        off = self.mode == "never" or self.off_for_graphs or checkpointed
        if off or not model.training or not torch.is_grad_enabled() or not layers or _sharded(layers[0]):
            return
        tensors = self._current(layers)
        if tensors is None:  # the signatures (a walk over every layer) only when something changed
            tensors = self._regroup(layers)
        try:
            stacks = self._stack(tensors)
        except RuntimeError:  # a member's tensor changed shape or device in place: group afresh
            stacks = self._stack(self._regroup(layers))
        group_priors, covered = [], frozenset()
        # with adapter.budget the loss prices the expected cost instead (leanlora.budget): no prior here
        from leanlora.budget import controller  # budget imports inject, which imports this module

        budgeted = getattr(model, "leanlora_shared", None) is not None and controller(model) is not None
        for group, stacked in zip(self._groups, stacks):
            if stacked is None:
                continue
            members = [layers[i] for i in group.members]
            plan, weights, priced = ((), (), frozenset()) if budgeted else group.prior_plan(stacked)
            try:
                outs = self.batched(group.template, stacked, plan, weights, group.cast)
            except Exception as err:
                outs = self._retry_eagerly(err, members, group.template, stacked, plan, weights, group.cast)
                if outs is None:
                    continue
            if plan:
                anchor = next((t for t in stacked.values() if t.requires_grad), None)
                if anchor is not None:  # the backward through these gates spends the prior evaluated with them
                    anchor.register_hook(_spender(self))
                    group_priors.append(outs[-1])
                    covered |= priced
                outs = outs[:-1]
            for layer, p in zip(members, split(outs, group.layout)):
                layer.__dict__["pieces"] = p
        if group_priors:
            self.pending_prior = (weakref.ref(model), group_priors, covered)

    def prior_for(self, model: nn.Module) -> tuple[list[torch.Tensor], frozenset[int]]:
        """(the grouped layers' prior terms of this forward, the ids of the modules they cover).

        Empty when the last training forward was not ``model``'s, or its backward already ran
        (the gates moved since, or the graph is gone): the caller evaluates every module itself.
        """
        pending = self.pending_prior
        if pending is None or pending[0]() is not model:
            return [], frozenset()
        return pending[1], pending[2]

    def _retry_eagerly(self, err: Exception, members, template, stacked, plan, weights, cast) -> tuple | None:
        """A compile failure: warn, go eager for good. A strategy vmap cannot batch: per layer, said once."""
        if self.batched is not batched_lowrank and is_compile_error(err):
            warnings.warn(f"leanlora: compiling the grouped adapter pieces failed ({root_cause(err)}); "
                          "they are computed eagerly", RuntimeWarning, stacklevel=2)
            self.batched = batched_lowrank
            try:
                return self.batched(template, stacked, plan, weights, cast)
            except Exception as again:
                err = again
        self.failed.add(signature(members[0]))
        warnings.warn(f"leanlora: the adapter pieces of {len(members)} layers like {members[0].name!r} "
                      f"could not be computed together ({type(err).__name__}: {err}); those layers "
                      "compute their own, as with vectorize='never'", RuntimeWarning, stacklevel=2)
        return None


def _hand_out(members: list[torch.Tensor]):
    """A post-accumulate-grad hook for a stack of ``members``: each member's ``.grad`` gains its slice.

    A member without a gradient gets the slice itself (a view: no copy, the stack's gradient
    was computed for this); one that has a gradient (accumulation over micro-batches) adds it.
    """
    def hand_out(stack: torch.Tensor) -> None:
        grads = stack.grad.unbind(0)
        stack.grad = None
        held = [(m.grad, g) for m, g in zip(members, grads) if m.grad is not None]
        if held:
            torch._foreach_add_([h for h, _ in held], [g for _, g in held])
        for m, g in zip(members, grads):
            if m.grad is None:
                m.grad = g

    return hand_out


def _spender(vectorizer: Vectorizer):
    """A gradient hook that drops the vectorizer's pending prior; by weak reference, so that a
    tensor kept elsewhere (a compiler's cache) does not keep the vectorizer and its model alive."""
    ref = weakref.ref(vectorizer)

    def spend(grad: torch.Tensor) -> None:
        owner = ref()
        if owner is not None:
            owner.pending_prior = None

    return spend


def compile_pieces(model: nn.Module, compile_mode: str | None = "default", backend="inductor") -> None:
    """Compile (or, with None, un-compile) the grouped pieces of an adapted model, if it has any."""
    vectorizer = getattr(getattr(model, "leanlora_shared", None), "vectorizer", None)
    if vectorizer is not None:
        vectorizer.use_compiler(compile_mode, backend)


@torch.compiler.disable
def refresh_pieces(model: nn.Module, args: tuple) -> None:
    """Forward pre-hook of the adapted model (module-level, so the hook survives deepcopy and pickle)."""
    shared = getattr(model, "leanlora_shared", None)
    vectorizer = getattr(shared, "vectorizer", None)
    if vectorizer is not None:
        with torch.profiler.record_function("leanlora: vectorize"):
            vectorizer.refresh(model)
