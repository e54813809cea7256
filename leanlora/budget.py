"""A BOPs budget for gated ranks and learned bits: the user says how small, the controller gets there.

``AdapterConfig(budget=β)`` asks for a finalized adapter whose BOPs are β times those of a plain
LoRA on the same modules at the same r with 16-bit factors (``lora_bops`` of :mod:`leanlora.reports.cost`).

**Cost.** Per adapted layer, as :mod:`leanlora.reports.cost` counts it (16-bit activations),
``bops = 16 (in·k·b_A + k·out·b_B + k·b_E)`` (the E term only with gated ``diag``), and
``C = Σ bops / Σ 16·16·(in + out)·r``. The *expected* cost replaces k and b by their expectations
under the gate open-probabilities q (:mod:`leanlora.gates.hardconcrete`): ``E[k] = 1 + Σ_i q_1···q_i``
(nested rank gates; ``Σ_i q_i`` when independent), ``E[b] = b_0 + Σ_j q_1···q_j (b_j - b_{j-1})``,
and E[k·b] = E[k]·E[b] (rank and bit gates are independent). It is differentiable in every gate.

**Schedule** (AdaLoRA's cubic budget schedule, arXiv 2303.10512), over a run of T steps with the
fractions (t_s, t_e, t_f) of ``budget_schedule`` and C_0 the expected cost at the first step::

    target(t) = C_0                                  t < t_s·T      (the factors learn first)
              = β + (C_0 - β) (1 - p)^3              p = (t - t_s·T) / ((t_e - t_s)·T)
              = β                                    t >= t_e·T

**Dual ascent.** The loss gets ``λ_t · (C - target_t)`` (it replaces the λ-weighted gate prior) with

    λ_{t+1} = max(0, λ_t + κ (C_t - target_t) / β / n_ramp),      n_ramp = (t_e - t_s)·T steps

The gap is relative to the budget and the step is per ramp length, so a gap of one budget held
over the whole ramp raises λ by κ whatever β and T are. λ is in units of task loss per LoRA-16
fraction, so it does not depend on ``gates.lr``: Adam moves each gate at about its learning rate
in the direction of its summed gradient, and λ sets only how the cost gradient weighs against
the task's. How *fast* gates can move does depend on ``gates.lr``; that is why the end is a projection.

**Freeze and projection** at t_f·T. The structure is fixed by one global order over the
components and bit levels of all modules (:func:`removal_order`): the prefix of it whose removal
leaves the thresholded cost nearest β is closed, so the finalized cost lands on the budget
whether or not the gates had time to travel to it. The gates are then pinned far past saturation (every sample and the
eval threshold agree, and their gradient through the clamp is 0), λ is 0, and the remaining
steps fine-tune the factors to the final structure. A pinned gate's value is its place in the
removal order (kept ones high, closed ones low), so a trained adapter carries its order: the
budget sweep re-thresholds it without the factors it has since fine-tuned changing the order, and
its own budget gives back the trained adapter (:mod:`leanlora.reports.budget_sweep`).

**Order.** Items are removed from the end of each chain (nesting: a component or bit level goes
only after every one behind it), lowest key first, with

    key = log α + log(distortion) - log(price)

log α is the gate's log-odds (up to a constant) and carries the task's verdict once gates have
moved; price is the BOPs the removal saves in the current structure (a rank component costs
16 (in·b_A + out·b_B + b_E), a bit level of A 16·in·k·(b_j - b_{j-1})); distortion is what the
removal does to the layer's update, ``scale·‖ΔW - ΔW'‖_F`` (a component: ``|d_i|·‖b_i‖·‖a_i‖``; a
bit level of A: ``‖B D (A_j - A_{j-1})‖_F``), so that gates which had no time to move (short runs,
a small ``gates.lr``) still remove float residuals before 8-bit ones and components that do
little before those that do much. Ties break by module order.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from leanlora.gates import hardconcrete as hc
from leanlora.config import ConfigError
from leanlora.groups.rows import row_of
from leanlora.inject import adapted_layers, shared_state

# The budget of ``adapter.budget: auto`` (the default) on a gated adapter. The bar it answers to
# is B-LoRA's claim (arXiv:2406.13046): LoRA's quality at about 30 % of LoRA-16's BOPs. A quarter
# leaves margin below that bar, and the controller lands within a few percent of its target.
DEFAULT_BUDGET = 0.25
ACT_BITS = 16
LORA_BITS = 16
# pinned gates: kept ones in [KEPT, KEPT + SPAN], closed ones in [CLOSED, CLOSED + SPAN], ordered by
# their place in the removal order; far past saturation, so samples and the eval threshold agree
KEPT, CLOSED, SPAN = 100.0, -300.0, 100.0
PINNED = 50.0          # every gate beyond ±this: the adapter carries a frozen order
BUDGET_TOLERANCE = 0.1  # the finalized cost is "on budget" within this relative distance
KAPPA = 1.0            # dual step: λ gain per budget-relative gap held over the ramp


# --- the model's gates as chains ----------------------------------------------------------------


@dataclass
class Chain:
    """One gate vector: the rank gates of a layer or the bit gates of one quantizer."""

    name: str                  # parameter name, e.g. "encoder.layer.0.query.ranks.log_alpha"
    layer: int                 # index into the layers' list
    kind: str                  # "rank", "a", "b" or "e"
    owner: nn.Module           # the strategy module whose log_alpha this is
    nested: bool
    steps: tuple[float, ...] = ()   # bits: b_j - b_{j-1} for each gate; rank: ()

    @property
    def log_alpha(self) -> torch.Tensor:
        """Read at each use: a row of its group's stack is a fresh view of the stack as it is now."""
        return self.owner.log_alpha


@dataclass
class LayerShape:
    in_f: int
    out_f: int
    r: int
    rank: int                              # fixed rank when the ranks are not gated
    bits: dict[str, float] = field(default_factory=dict)   # fixed bits of "a", "b", "e" (absent: gated)
    base_bits: dict[str, float] = field(default_factory=dict)   # b_0 of a learned quantizer
    has_e: bool = False


def gate_chains(model: nn.Module) -> tuple[list[LayerShape], list[Chain]]:
    """Every adapted layer's shape and every gate chain the budget can act on."""
    from leanlora.precision.learned import LearnedBits
    from leanlora.ranks.gated import GatedRanks

    shapes, chains = [], []
    r = shared_state(model).config.r
    for i, (name, layer) in enumerate(adapted_layers(model)):
        ranks = layer.ranks
        gated = isinstance(ranks, GatedRanks) and not ranks.finalized
        qe = ranks.diag_quantizer() if isinstance(ranks, GatedRanks) else None
        shape = LayerShape(layer.in_features, layer.out_features, r, ranks.rank if gated else ranks.active_rank(),
                           has_e=qe is not None)
        if gated and ranks.log_alpha.numel():
            chains.append(Chain(f"{name}.ranks.log_alpha", i, "rank", ranks, ranks.nested))
        quantizers = (("a", layer.quant_a, "quant_a"), ("b", layer.quant_b, "quant_b"), ("e", qe, "ranks.quant_e"))
        for kind, q, path in quantizers:
            if isinstance(q, LearnedBits):
                shape.base_bits[kind] = float(q.bit_set[0])
                steps = tuple(float(b - a) for a, b in zip(q.bit_set, q.bit_set[1:]))
                chains.append(Chain(f"{name}.{path}.log_alpha", i, kind, q, True, steps))
            elif q is not None:
                shape.bits[kind] = float(q.bits())
        shapes.append(shape)
    return shapes, chains


def lora16_bops(shapes: list[LayerShape]) -> int:
    """BOPs of a plain LoRA of the same modules at rank r with 16-bit factors."""
    return sum((s.in_f + s.out_f) * s.r * LORA_BITS * ACT_BITS for s in shapes)


# --- expected cost (differentiable) -----------------------------------------------------------

_KINDS = ("rank", "a", "b", "e")


def _gate_sources(chains: list[Chain]) -> tuple[list[nn.Module], list[int]]:
    """(modules whose ``log_alpha`` holds the gates, the flat index of each chain's gates among them).

    A grouped layer's gates are a row of its group's stacked ``log_alpha`` (:mod:`leanlora.groups`):
    the stack is read once per expression instead of one row at a time.
    """
    sources: dict[int, tuple[int, nn.Module]] = {}  # id of each holder -> (its offset, the holder)
    picks: list[int] = []
    total = 0
    for c in chains:
        holder, row = row_of(c.owner, "log_alpha")
        if id(holder) not in sources:
            sources[id(holder)] = (total, holder)
            total += holder.log_alpha.numel()
        width = c.log_alpha.numel()
        first = sources[id(holder)][0] + (0 if row is None else row * width)
        picks.extend(range(first, first + width))
    return [holder for _, holder in sources.values()], picks


class CostPlan:
    """The expected cost of a model's gates as one batched expression.

    The gate vectors (chains) are laid out as rows of one padded matrix, so the open-probabilities
    of every chain (prefix products for nested chains, plain q for independent ones) take a few
    kernels for the whole model, and each layer's E[k] and E[b] are scatter-sums of the row sums
    into per-layer vectors. Padding is +PAD log-odds (q = 1 in the prefix product) with weight 0.
    Built from :func:`gate_chains`; valid while the adapter's structure is unchanged (a training
    run: finalize and pruning come after it).
    """

    PAD = 1e4

    def __init__(self, shapes: list[LayerShape], chains: list[Chain]) -> None:
        self.shapes, self.chains = shapes, chains
        self.lora16 = lora16_bops(shapes)
        self._sources, picks = _gate_sources(chains)
        sizes = [c.log_alpha.numel() for c in chains]
        self.width = max(sizes, default=0)
        rank_gated = {c.layer for c in chains if c.kind == "rank"}
        floats = {key: [float(getattr(s, key)) for s in shapes] for key in ("in_f", "out_f", "has_e")}
        floats.update(rank=[1.0 if i in rank_gated else float(s.rank) for i, s in enumerate(shapes)],
                      weights=[[float(w) for w in (c.steps or (1.0,) * n)] + [0.0] * (self.width - n)
                               for c, n in zip(chains, sizes)])
        for kind in ("a", "b", "e"):
            floats[kind] = [s.bits.get(kind, s.base_bits.get(kind, 0.0)) for s in shapes]
        indices = {"picks": picks, "rows": [i for i, n in enumerate(sizes) for _ in range(n)],
                   "cols": [j for n in sizes for j in range(n)]}
        for kind in _KINDS:  # which chains feed which layer's E[k] or E[b], as indices (masks would sync)
            indices[f"chains_{kind}"] = [i for i, c in enumerate(chains) if c.kind == kind]
            indices[f"layers_{kind}"] = [c.layer for c in chains if c.kind == kind]
        # host lists by the dtype of their device tensors (nested: one row per chain)
        nested = {"nested": [[c.nested] for c in chains]}
        self._host = ((floats, torch.float32), (indices, torch.long), (nested, torch.bool))
        self._device_tensors: dict[Any, dict[str, torch.Tensor]] = {}
        self._pinned: tuple[int, list[torch.Tensor]] | None = None  # (id of the pins, each store's values)

    def _tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device not in self._device_tensors:  # host lists become device tensors once per device
            self._device_tensors[device] = {k: torch.tensor(v, dtype=dtype, device=device)
                                            for values, dtype in self._host for k, v in values.items()}
        return self._device_tensors[device]

    def expected(self) -> torch.Tensor:
        """E[BOPs] / LoRA-16 BOPs (a scalar with a gradient to every gate)."""
        if not self.chains:
            return torch.tensor(_Structure(self.shapes, []).cost)  # the fixed structure's thresholded cost
        device = self.chains[0].log_alpha.device
        t = self._tensors(device)
        # every group's stacked gates read once, then each chain's row picked out in chain order
        stores = [getattr(owner, "log_alpha").reshape(-1) for owner in self._sources]
        flat = (stores[0] if len(stores) == 1 else torch.cat(stores)).float().index_select(0, t["picks"])
        grid = torch.full((len(self.chains), self.width), self.PAD, device=device).index_put((t["rows"], t["cols"]), flat)
        opened = torch.where(t["nested"], hc.open_chain(grid, dim=1), hc.prob_open(grid))
        sums = (opened * t["weights"]).sum(1)                                  # one per chain
        per_layer = {kind: t[kind].index_add(0, t[f"layers_{kind}"], sums.index_select(0, t[f"chains_{kind}"]))
                     for kind in _KINDS}
        k = per_layer["rank"]
        bops = t["in_f"] * k * per_layer["a"] + k * t["out_f"] * per_layer["b"] + t["has_e"] * k * per_layer["e"]
        return ACT_BITS * bops.sum() / self.lora16


    @torch.no_grad()
    def pin(self, pins: dict[str, torch.Tensor]) -> None:
        """Write ``pins`` (per chain name) into the gates: one copy for all stores, not one per chain
        (a run re-pins every step after the freeze). Entries of a store outside every chain keep the
        values they had when these pins were first written."""
        stores = [owner.log_alpha for owner in self._sources]
        if self._pinned is None or self._pinned[0] != id(pins):
            flat = torch.cat([s.detach().reshape(-1).float() for s in stores])
            pinned = torch.cat([pins[c.name].reshape(-1).float() for c in self.chains])
            flat[self._tensors(flat.device)["picks"]] = pinned.to(flat.device)
            values = [v.view_as(s).to(s.dtype) for v, s in zip(flat.split([s.numel() for s in stores]), stores)]
            self._pinned = (id(pins), values)
        torch._foreach_copy_([s.detach() for s in stores], self._pinned[1])


def expected_cost(model: nn.Module) -> torch.Tensor:
    """E[BOPs] / LoRA-16 BOPs under the current gate probabilities (a scalar with gradient).

    ``E[k] = 1 + Σ_i q_1···q_i`` (nested rank gates; ``Σ_i q_i`` when independent) and
    ``E[b] = b_0 + Σ_j q_1···q_j (b_j - b_{j-1})`` per layer, summed as :mod:`leanlora.cost` sums BOPs
    (:class:`CostPlan`)."""
    plan = CostPlan(*gate_chains(model))
    cost = plan.expected()
    if not plan.chains:  # nothing gated: a constant, on the model's device
        cost = cost.to(next((p.device for p in model.parameters()), None))
    return cost


# --- the global order and the projection ------------------------------------------------------


class Item(NamedTuple):
    chain: int      # index into the chains
    index: int      # gate index within the chain


class _Structure:
    """Open items per chain and the thresholded cost of that structure, as items are removed."""

    def __init__(self, shapes: list[LayerShape], chains: list[Chain]) -> None:
        self.shapes, self.chains = shapes, chains
        self.open = [[True] * c.log_alpha.numel() for c in chains]
        self.k = [float(s.rank) for s in shapes]
        self.bits = [dict(s.bits) for s in shapes]
        for c in chains:
            if c.kind != "rank":
                self.bits[c.layer][c.kind] = shapes[c.layer].base_bits[c.kind] + sum(c.steps)
        self.lora = lora16_bops(shapes)
        self.bops = sum(self.layer_bops(i) for i in range(len(shapes)))

    def component_bops(self, i: int) -> float:
        """BOPs of one rank component of layer ``i`` at its current bits (whole numbers: exact in floats)."""
        s, bits = self.shapes[i], self.bits[i]
        return float(ACT_BITS * (s.in_f * bits["a"] + s.out_f * bits["b"] + (bits["e"] if s.has_e else 0.0)))

    def layer_bops(self, i: int) -> float:
        return self.k[i] * self.component_bops(i)

    def price(self, item: Item) -> float:
        c = self.chains[item.chain]
        s = self.shapes[c.layer]
        if c.kind == "rank":
            return self.component_bops(c.layer)
        width = {"a": s.in_f, "b": s.out_f, "e": 1}[c.kind]
        return ACT_BITS * width * self.k[c.layer] * c.steps[item.index]

    def candidates(self, ci: int) -> list[Item]:
        """Items of chain ``ci`` that may go next: the last open one when nested, any open one otherwise."""
        items = [Item(ci, j) for j, on in enumerate(self.open[ci]) if on]
        return items[-1:] if self.chains[ci].nested else items

    def remove(self, item: Item) -> None:
        c = self.chains[item.chain]
        before = self.layer_bops(c.layer)
        self.open[item.chain][item.index] = False
        if c.kind == "rank":
            self.k[c.layer] -= 1.0
        else:
            self.bits[c.layer][c.kind] -= c.steps[item.index]
        self.bops += self.layer_bops(c.layer) - before

    @property
    def cost(self) -> float:
        return self.bops / self.lora


def _fro2(x: torch.Tensor, y: torch.Tensor) -> float:
    """‖x @ y‖_F² from the r×r Gram matrices (never the out×in product)."""
    return float(((x.T @ x) * (y @ y.T)).sum())


@torch.no_grad()
def _layer_distortions(layer: nn.Module, chains: list[Chain], picked: list[int]) -> dict[Item, float]:
    """scale·‖ΔW - ΔW'‖_F of removing each item of this layer's chains (``picked``) from the full structure."""
    from leanlora.layer import _eval_mode
    from leanlora.precision.learned import level_values

    with _eval_mode(layer):
        a, b = (t.float() for t in layer.factors())                          # (r, in), (out, r)
        ranks = layer.ranks
        e = ranks.E.detach().float() if getattr(ranks, "E", None) is not None else a.new_ones(a.shape[0])
        scale = float(ranks.select(a, b)[3])  # eval mode: the full structure's scale
        full = {"a": a, "b": b, "e": e}
        quantizers = {"a": layer.quant_a, "b": layer.quant_b, "e": ranks.diag_quantizer()}
        levels = {kind: level_values(full[kind], q.x_max(full[kind]), q._steps, q._qmax, q.has_float, False)
                  for kind, q in quantizers.items() if hasattr(q, "bit_set")}  # the learned quantizers
        a_top, b_top, e_top = (levels[kind][-1] if kind in levels else full[kind] for kind in ("a", "b", "e"))
        bd = b_top * e_top.to(b_top.device)                                   # B D (out, r)
        out = {}
        for ci in picked:
            c = chains[ci]
            for j in range(c.log_alpha.numel()):
                if c.kind == "rank":  # gate j closes component j + 1
                    d2 = float(bd[:, j + 1].norm() ** 2 * a_top[j + 1].norm() ** 2)
                else:  # ‖x y‖_F² of the factors with level j + 1 of this quantizer's tensor dropped to level j
                    step = levels[c.kind][j + 1] - levels[c.kind][j]
                    if c.kind == "a":
                        d2 = _fro2(bd, step)
                    else:
                        d2 = _fro2(step * e_top if c.kind == "b" else b_top * step, a_top)
                out[Item(ci, j)] = scale * math.sqrt(max(d2, 0.0))
    return out


def is_pinned(chains: list[Chain]) -> bool:
    """Whether every gate is pinned (a frozen budget run): its order is then its values."""
    return bool(chains) and all(bool((c.log_alpha.detach().abs() >= PINNED).all()) for c in chains)


def removal_order(model: nn.Module) -> tuple[list[Item], list[float], float, list[Chain]]:
    """(items in removal order, cost after each removal, full cost, chains): see the module docstring."""
    shapes, chains = gate_chains(model)
    logits = [c.log_alpha.detach().float().cpu().tolist() for c in chains]
    st = _Structure(shapes, chains)
    full = st.cost
    by_layer: dict[int, list[int]] = {}
    for ci, c in enumerate(chains):
        by_layer.setdefault(c.layer, []).append(ci)
    if is_pinned(chains):  # the frozen order, read back from the values
        key = lambda item: logits[item.chain][item.index]  # noqa: E731
    else:
        dist: dict[Item, float] = {}
        for i, (_, layer) in enumerate(adapted_layers(model)):
            if i in by_layer:
                dist.update(_layer_distortions(layer, chains, by_layer[i]))
        key = lambda item: (logits[item.chain][item.index] + math.log(dist[item] + 1e-12)  # noqa: E731
                            - math.log(max(st.price(item), 1e-30)))

    def best(layer: int) -> tuple[float, int, int, Item] | None:
        """The layer's next item, with its sort key (ties: lower chain, then later gate); prices change
        within a layer only."""
        return min(((key(it), it.chain, -it.index, it) for ci in by_layer[layer] for it in st.candidates(ci)),
                   default=None)

    heads = {layer: best(layer) for layer in by_layer}
    order, costs = [], []
    while live := [head for head in heads.values() if head is not None]:
        item = min(live)[3]
        st.remove(item)
        order.append(item)
        costs.append(st.cost)
        heads[chains[item.chain].layer] = best(chains[item.chain].layer)
    return order, costs, full, chains


def closed_items(order: list[Item], costs: list[float], full: float, budget: float) -> list[Item]:
    """The prefix of ``order`` whose removal leaves the cost nearest ``budget`` (the cheaper one on a tie).

    Nearest rather than at-most: the item that crosses the budget can be large (a float residual
    of a wide module), and stopping just above it lands closer than removing it.
    """
    if full <= budget:
        return []
    for n, (before, cost) in enumerate(zip([full, *costs], costs), start=1):
        if cost <= budget:
            return order[:n] if budget - cost <= before - budget else order[:n - 1]
    return list(order)


@torch.no_grad()
def pinned_values(chains: list[Chain], order: list[Item], n_closed: int) -> dict[str, torch.Tensor]:
    """Gate values that close the first ``n_closed`` items of ``order`` and encode the order itself."""
    step = SPAN / max(len(order), 1)
    values = [[KEPT + SPAN] * c.log_alpha.numel() for c in chains]  # never removable: stays open
    for pos, it in enumerate(order):
        values[it.chain][it.index] = (CLOSED if pos < n_closed else KEPT) + pos * step
    return {c.name: torch.tensor(v, dtype=torch.float32) for c, v in zip(chains, values)}


@torch.no_grad()
def apply_pins(chains: list[Chain], pins: dict[str, torch.Tensor]) -> None:
    for c in chains:
        c.log_alpha.copy_(pins[c.name].to(c.log_alpha.device, c.log_alpha.dtype))


def floor_cost(model: nn.Module, plan: CostPlan | None = None) -> float:
    """The smallest cost (over LoRA-16) the gates can reach: every removable component and bit level
    off. ``plan``: the model's gates already laid out (the controller's), instead of walking it again."""
    shapes, chains = (plan.shapes, plan.chains) if plan is not None else gate_chains(model)
    st = _Structure(shapes, chains)
    for ci, c in enumerate(chains):
        for j in range(c.log_alpha.numel()):
            st.remove(Item(ci, j))
    return st.cost


def project(model: nn.Module, budget: float) -> dict[str, Any]:
    """Pin the gates to the structure of ``budget`` by the global order; returns the pins and costs."""
    order, costs, full, chains = removal_order(model)
    closed = closed_items(order, costs, full, budget)
    pins = pinned_values(chains, order, len(closed))
    apply_pins(chains, pins)
    return {"pins": pins, "cost": costs[len(closed) - 1] if closed else full, "full": full, "removed": len(closed)}


# --- the controller ---------------------------------------------------------------------------


class BudgetController:
    """Target schedule, dual ascent on λ, freeze and projection; see the module docstring.

    Model-wide state on ``leanlora_shared.budget``; its :meth:`state_dict` goes into checkpoints.
    """

    def __init__(self, budget: float, schedule: tuple[float, float, float]) -> None:
        self.budget = float(budget)
        self.start_frac, self.end_frac, self.freeze_frac = schedule
        self.total: int | None = None
        self.full: float | torch.Tensor | None = None     # C_0, the expected cost at the first step
        self.lmbda: float | torch.Tensor = 0.0
        self.target: float | None = None
        self.cost: float | torch.Tensor | None = None     # expected cost at the last step
        self.frozen = False
        self.final_cost: float | None = None
        self.pins: dict[str, torch.Tensor] | None = None
        self._plan: CostPlan | None = None  # the gates' layout, fixed while the run trains
        self._modes_pinned: bool | None = None  # what mark_pinned last told the gated modules (None: not yet)

    def plan(self, model: nn.Module) -> CostPlan:
        if self._plan is None:
            self._plan = CostPlan(*gate_chains(model))
        return self._plan

    # schedule ---------------------------------------------------------------------------------

    def steps(self) -> tuple[int, int, int]:
        """(ramp start, ramp end, freeze) as optimizer steps of this run."""
        if self.total is None:
            raise RuntimeError("adapter.budget: the controller does not know the run length; call "
                               "leanlora.budget.start(model, total_steps) before training (leanlora's loop "
                               "and LeanLoraTrainer do)")
        t = self.total
        s = round(self.start_frac * t)
        e = max(round(self.end_frac * t), s + 1)
        # the freeze happens within the run, however short: its last step at the latest
        return s, e, min(max(round(self.freeze_frac * t), e), t - 1)

    def target_at(self, step: int) -> float:
        s, e, _ = self.steps()
        full = self.full if self.full is not None else 1.0
        if step < s:
            return full
        if step >= e:
            return self.budget
        p = (step - s) / (e - s)
        return self.budget + (full - self.budget) * (1.0 - p) ** 3

    # per step ---------------------------------------------------------------------------------

    def advance(self, model: nn.Module, step: int) -> None:
        """Move to optimizer step ``step``: dual ascent, or the freeze, or re-pinning after it.

        C_0, λ and the cost stay 0-dim tensors on the gates' device, so a step costs no host sync;
        they become numbers only in logs and checkpoints (restored as float32 tensors, so a resumed
        run computes what an uninterrupted one does). λ and the target are written in place into
        the same two tensors every step, which the penalty reads: a training step captured as a
        CUDA graph (``train.cuda_graph``) sees each step's values when it is replayed. The freeze
        changes what the step computes (no penalty, pinned gates): a captured step is captured
        again after it (the training loop does)."""
        s, e, freeze = self.steps()
        if self.frozen:
            self.plan(model).pin(self.pins)  # undo what Adam's momentum moved since
        elif step >= freeze:
            self.freeze(model)
        else:
            with torch.no_grad():
                cost = self.plan(model).expected().detach()
                self.cost = cost
                self.full = cost if self.full is None else torch.as_tensor(self.full, dtype=cost.dtype).to(cost.device)
                target = torch.as_tensor(self.target_at(step), dtype=cost.dtype).to(cost.device)
                lmbda = torch.as_tensor(self.lmbda, dtype=cost.dtype).to(cost.device)
                if step >= s:
                    lmbda = torch.clamp(lmbda + KAPPA * (cost - target) / self.budget / (e - s), min=0.0)
                self.target, self.lmbda = _in_place(self.target, target), _in_place(self.lmbda, lmbda)
        if self._modes_pinned is not self.frozen:  # a run's first step, its freeze, or a resume
            mark_pinned(model, self.frozen)
            self._modes_pinned = self.frozen

    def freeze(self, model: nn.Module) -> None:
        done = project(model, self.budget)
        self.pins, self.final_cost = done["pins"], done["cost"]
        self.frozen, self.lmbda, self.target, self.cost = True, 0.0, self.budget, done["cost"]

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """λ_t · (E[C] - target_t), the Lagrangian's term, for the loss; 0 (no graph) once frozen or
        before the first :meth:`advance`. Its gradient is λ_t ∇E[C] (0 before the ramp, where λ is
        0, with the same operations as after: see :meth:`advance`); the target only keeps the
        logged loss readable."""
        if self.frozen or not isinstance(self.lmbda, torch.Tensor):
            return torch.zeros((), device=next((p.device for p in model.parameters()), None))
        return self.lmbda * (self.plan(model).expected() - self.target)

    # checkpoint ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state: a resumed run continues exactly where this one stands."""
        pins = None if self.pins is None else {k: v.float().cpu().tolist() for k, v in self.pins.items()}
        return {"budget": self.budget, "total": self.total, "full": _number(self.full), "lmbda": _number(self.lmbda),
                "target": _number(self.target), "cost": _number(self.cost), "frozen": self.frozen,
                "final_cost": self.final_cost, "pins": pins}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("total", "frozen", "final_cost"):
            setattr(self, key, state[key])
        for key in ("full", "lmbda", "target", "cost"):  # tensors again, as advance keeps them
            value = state[key]
            setattr(self, key, value if value is None or self.frozen else torch.tensor(value, dtype=torch.float32))
        self.pins = None if state["pins"] is None else {k: torch.tensor(v) for k, v in state["pins"].items()}
        self._modes_pinned = None  # the next advance tells the modules


def mark_pinned(model: nn.Module, pinned: bool) -> None:
    """Tell every gated strategy module (members and group templates) whether its gates are pinned.

    Pinned gates sample exactly their 0/1 threshold, with no gradient through the clamp, so a
    pinned module trains on the threshold and a quantizer computes only its chosen level: the same
    values and gradients as sampling, without the gate noise (and its random numbers) or the other
    levels. A run's first training step after the freeze therefore compiles once more."""
    from leanlora.precision.learned import LearnedBits
    from leanlora.ranks.gated import GatedRanks

    for module in model.modules():
        if isinstance(module, (GatedRanks, LearnedBits)):
            module.pinned = pinned


def _number(x: float | torch.Tensor | None) -> float | None:
    return float(x) if isinstance(x, torch.Tensor) else x


# --- the functions the loops call -------------------------------------------------------------


def resolved(config: Any) -> float | None:
    """The budget a training loop that calls :func:`start` applies: the configured fraction,
    ``DEFAULT_BUDGET`` for "auto" on a gated adapter, else None."""
    budget = getattr(config, "budget", None)
    if budget == "auto":
        return DEFAULT_BUDGET if config.is_gated else None
    return budget


def controller(model: nn.Module) -> BudgetController | None:
    """The model's budget controller, or None when the adapter has no budget.

    An explicit budget has its controller from the start (a loop that never calls :func:`start`
    is told to); "auto" has one only once :func:`start` gave it the run's length, so a loop that
    does not know its length trains with the gate prior alone."""
    shared = shared_state(model)
    ctl = getattr(shared, "budget_controller", None)
    budget = getattr(shared.config, "budget", None)
    if ctl is None and isinstance(budget, (int, float)):
        ctl = shared.budget_controller = BudgetController(budget, shared.config.budget_schedule)
    return ctl


def start(model: nn.Module, total_steps: int, auto: bool = True) -> None:
    """Tell the budget controller how long the run is; with ``adapter.budget: auto`` on a gated
    adapter this is what turns the default budget on (``auto=False`` leaves it off: settings the
    controller does not support). No-op without a budget."""
    shared = shared_state(model)
    default = resolved(shared.config) if shared.config.budget == "auto" and auto else None
    if default is not None and getattr(shared, "budget_controller", None) is None:
        shared.budget_controller = BudgetController(default, shared.config.budget_schedule)
    ctl = controller(model)
    # a model trained before (pinned by its freeze) samples its gates again unless this run is frozen
    mark_pinned(model, ctl is not None and ctl.frozen)
    if ctl is None:
        return
    if total_steps < 1:
        raise ConfigError(f"adapter.budget needs a run of at least 1 step, got {total_steps}")
    ctl.total = int(total_steps)
    _check_reachable(model, ctl, explicit=default is None)


def _check_reachable(model: nn.Module, ctl: BudgetController, explicit: bool) -> None:
    """A budget that the cheapest structure the gates allow misses by more than the projection's
    tolerance (10 %) would finalize above it: an explicit one is refused, the default one is raised
    to that floor with a warning."""
    floor = floor_cost(model, ctl.plan(model))
    if floor <= ctl.budget * (1 + BUDGET_TOLERANCE):
        return
    cfg = shared_state(model).config
    how = ("learn the bits (adapter.precision=learned)" if cfg.precision != "learned" else
           "gate the ranks (adapter.ranks=gated)" if cfg.ranks != "gated" else "raise adapter.r")
    message = (f"adapter.budget={ctl.budget:g} is below the smallest cost this adapter can reach, {floor:.3g} of "
               f"LoRA-16's BOPs (ranks={cfg.ranks!r}, precision={cfg.precision!r}, r={cfg.r})")
    if explicit:
        raise ConfigError(f"{message}; set adapter.budget >= {math.ceil(floor * 1000) / 1000:g}, or {how}")
    warnings.warn(f"{message}: it finalizes at {floor:.3g}; to go lower, {how}", UserWarning, stacklevel=3)
    ctl.budget = floor


def _in_place(old: Any, new: torch.Tensor) -> torch.Tensor:
    """``new``'s value in ``old`` when ``old`` is a tensor of its kind (so a captured step that
    read ``old`` sees it), else ``new`` itself."""
    if isinstance(old, torch.Tensor) and old.shape == new.shape and old.dtype == new.dtype \
            and old.device == new.device:
        return old.copy_(new)
    return new


def frozen(model: nn.Module) -> bool:
    """Whether the model's budget has frozen its structure (False without a budget)."""
    ctl = controller(model)
    return ctl is not None and ctl.frozen


def supported(distributed: str) -> bool:
    """Whether the controller can run with this ``train.distributed`` (see :func:`check_run`):
    every one but FSDP2 (a captured CUDA-graph step is fine: see :meth:`BudgetController.advance`)."""
    return distributed != "fsdp2"


def check_run(budget: float | str | None, distributed: str) -> None:
    """Refuse an explicit budget under settings the controller does not support, naming them
    ("auto" steps aside there: the loop passes ``auto=False`` to :func:`start`)."""
    if not isinstance(budget, (int, float)):
        return
    if not supported(distributed):
        raise ConfigError("adapter.budget is not supported with train.distributed='fsdp2' (the expected cost needs "
                          "whole gate tensors); use 'ddp' or 'none', or adapter.budget=off for the plain gate prior")


def summary(model: nn.Module) -> dict[str, float]:
    """{"cost", "target", "lambda"} for logs and the progress bar; {} without a budget."""
    ctl = controller(model)
    if ctl is None:
        return {}
    if ctl.cost is None:
        with torch.no_grad():
            ctl.cost = float(expected_cost(model))
    cost = _number(ctl.cost)
    return {"cost": cost, "target": cost if ctl.target is None else _number(ctl.target), "lambda": _number(ctl.lmbda)}


def structure_ready(model: nn.Module) -> bool:
    """Whether the adapter now has its final structure: always without a budget, after the freeze with one."""
    ctl = controller(model)
    return ctl is None or ctl.frozen


def cost_summary(model: nn.Module) -> dict[str, Any]:
    """The ``cost`` object of metrics.json: the finalized adapter's BOPs, bytes and ranks."""
    from leanlora.reports.cost import cost_report

    t = cost_report(model).total
    out = {"bops": t["bops"], "bops_lora16": t["lora_bops"], "bops_vs_lora16": t["bops_vs_lora"],
           "bytes": t["stored_bytes"], "adapter_bytes": t["adapter_bytes"], "mean_rank": t["mean_rank"],
           "mean_bits_a": t["mean_bits_a"], "mean_bits_b": t["mean_bits_b"]}
    if (ctl := controller(model)) is not None:
        out["budget"] = ctl.budget
    return out


def postfix(summary: dict[str, float]) -> dict[str, str]:
    """Progress-bar fields of a :func:`summary`: ``cost=0.61/0.45`` (expected cost / target, of LoRA-16)."""
    if "cost" not in summary:
        return {}
    return {"cost": f"{summary['cost']:.2f}/{summary['target']:.2f}"}
