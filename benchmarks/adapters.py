"""The methods every benchmark compares: leanlora points of the design and their PEFT anchors.

One place names each method's configuration so that ``speed.py`` and ``quality.py`` measure the
same thing. A leanlora method whose strategy modules are not in the tree yet (they land one axis
at a time) is reported as unavailable with the missing module named, never faked.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Strategy modules each design axis needs beyond the dense LoRA core.
_AXIS_MODULES = {
    "bank": "leanlora.factors.bank",
    "nested": "leanlora.ranks.nested",
    "gated": "leanlora.ranks.gated",
    "learned": "leanlora.precision.learned",
    "nf4": "leanlora.base.nf4",
    "fp8": "leanlora.base.fp8",
    "auto": "leanlora.base.choice",  # not an axis: the base left to the library's choice
}


@dataclass(frozen=True)
class Method:
    """One row of a benchmark: who implements it and which axes it uses."""

    name: str
    library: str  # "leanlora" or "peft"
    axes: tuple[str, ...] = ()  # leanlora axes beyond dense LoRA (keys of _AXIS_MODULES)
    kind: str = "lora"  # peft: lora | qlora | vblora | adalora
    overrides: dict[str, Any] = field(default_factory=dict)  # leanlora AdapterConfig fields
    peft_kwargs: dict[str, Any] = field(default_factory=dict)  # extra get_peft_model arguments
    # Liger-Kernel on the Llama model before PEFT wraps it: RMSNorm, SwiGLU, RoPE and the fused
    # linear cross-entropy (its RoPE patch is process-wide: such a row needs a process of its own)
    liger: bool = False

    @property
    def has_prior(self) -> bool:
        return "gated" in self.axes or "learned" in self.axes


METHODS = {
    "peft_lora": Method("PEFT LoRA", "peft", kind="lora"),
    # PEFT keeps fp32 adapters on a bf16 model unless told not to; this row runs its adapter in bf16,
    # which is what leanlora's adapter path does on bf16 activations (fp32 master weights there).
    "peft_lora_bf16": Method("PEFT LoRA (bf16 adapters)", "peft", kind="lora",
                             peft_kwargs={"autocast_adapter_dtype": False}),
    "peft_lora_bf16_liger": Method("PEFT LoRA (bf16 adapters) + Liger-Kernel", "peft", kind="lora",
                                   peft_kwargs={"autocast_adapter_dtype": False}, liger=True),
    "peft_qlora": Method("PEFT QLoRA (bnb nf4)", "peft", kind="qlora"),
    "peft_vblora": Method("PEFT VB-LoRA", "peft", kind="vblora"),
    "peft_adalora": Method("PEFT AdaLoRA", "peft", kind="adalora"),
    "lean_lora": Method("leanlora LoRA", "leanlora"),
    "lean_qlora": Method("leanlora QLoRA (nf4)", "leanlora", axes=("nf4",)),
    "lean_dylora": Method("leanlora DyLoRA (nested)", "leanlora", axes=("nested",)),
    "lean_qdylora": Method("leanlora QDyLoRA (nf4 + nested)", "leanlora", axes=("nf4", "nested")),
    "lean_vblora": Method("leanlora VB-LoRA (bank)", "leanlora", axes=("bank",)),
    "lean_blora": Method("leanlora B-LoRA (gated + learned bits, default budget)", "leanlora", axes=("gated", "learned")),
    "lean_blora_b10": Method("leanlora B-LoRA, budget 0.1", "leanlora", axes=("gated", "learned"),
                             overrides={"budget": 0.1}),
    "lean_blora_prior": Method("leanlora B-LoRA, prior only (budget off)", "leanlora", axes=("gated", "learned"),
                               overrides={"budget": "off"}),
    "lean_vblora_90": Method("leanlora VB-LoRA, bank 90 x 128", "leanlora", axes=("bank",),
                             overrides={"bank": {"num_vectors": 90, "vector_length": 128}}),
    "lean_vblora_lr1e3": Method("leanlora VB-LoRA, bank lr 1e-3", "leanlora", axes=("bank",),
                                overrides={"bank": {"bank_lr": 1e-3}}),
    "lean_vblora_lr3e3": Method("leanlora VB-LoRA, bank lr 3e-3", "leanlora", axes=("bank",),
                                overrides={"bank": {"bank_lr": 3e-3}}),
    "lean_vblora_scaled": Method("leanlora VB-LoRA, scaled update, bank lr 3e-3", "leanlora", axes=("bank",),
                                 overrides={"bank": {"bank_lr": 3e-3, "scaled": True}}),
    "lean_qdylora_max": Method("leanlora QDyLoRA, scale alpha/r", "leanlora", axes=("nf4", "nested"),
                               overrides={"nested": {"scale": "max"}}),
    "lean_qdylora_sqrt": Method("leanlora QDyLoRA, scale alpha/sqrt(b r)", "leanlora", axes=("nf4", "nested"),
                                overrides={"nested": {"scale": "sqrt"}}),
    "lean_qdylora_uniform": Method("leanlora QDyLoRA, DyLoRA's uniform draw (full_share 0)", "leanlora",
                                   axes=("nf4", "nested"), overrides={"nested": {"full_share": 0.0}}),
    "lean_qdylora_full50": Method("leanlora QDyLoRA, half the steps at the full rank", "leanlora",
                                  axes=("nf4", "nested"), overrides={"nested": {"full_share": 0.5}}),
    "lean_dylora_full50": Method("leanlora DyLoRA, half the steps at the full rank", "leanlora",
                                 axes=("nested",), overrides={"nested": {"full_share": 0.5}}),
    "lean_lora_fp8": Method("leanlora LoRA, fp8 base", "leanlora", axes=("fp8",)),
    "lean_lora_q4": Method("leanlora LoRA, factors at 4 bits (fixed)", "leanlora", axes=(),
                           overrides={"precision": "fixed", "quant": {"bits": 4}}),
    "lean_lora_r4_q8": Method("leanlora LoRA, r 4, factors at 8 bits (fixed)", "leanlora", axes=(),
                              overrides={"r": 4, "precision": "fixed", "quant": {"bits": 8}}),
    "lean_blora_early": Method("leanlora B-LoRA, default budget, frozen at 25 % of the run", "leanlora",
                               axes=("gated", "learned"), overrides={"budget_schedule": (0.05, 0.2, 0.25)}),
    "lean_blora_freeze5": Method("leanlora B-LoRA, default budget, frozen at 5 % of the run", "leanlora",
                                 axes=("gated", "learned"), overrides={"budget_schedule": (0.0, 0.04, 0.05)}),
    "lean_blora_early_b30": Method("leanlora B-LoRA, budget 0.3, frozen at 25 % of the run", "leanlora",
                                   axes=("gated", "learned"), overrides={"budget": 0.3, "budget_schedule": (0.05, 0.2, 0.25)}),
    "lean_blora_nodiag": Method("leanlora B-LoRA, plain B·A (no diag E), frozen at 25 % of the run", "leanlora",
                                axes=("gated", "learned"),
                                overrides={"gated": {"diag": False}, "budget_schedule": (0.05, 0.2, 0.25)}),
    "lean_lora_learned_bits": Method("leanlora LoRA with learned bits only, default budget, frozen at 25 %", "leanlora",
                                     axes=("learned",), overrides={"budget_schedule": (0.05, 0.2, 0.25)}),
    "lean_blora_mid_freeze": Method("leanlora B-LoRA, default budget, frozen at 40 % of the run", "leanlora",
                                    axes=("gated", "learned"), overrides={"budget_schedule": (0.1, 0.3, 0.4)}),
    # the backward transposes the codes in each step instead of holding them transposed (fp8.transposed_copy)
    "lean_lora_fp8_notcopy": Method("leanlora LoRA, fp8 base, codes transposed in each backward", "leanlora",
                                    axes=("fp8",), overrides={"fp8": {"transposed_copy": False}}),
    "lean_dylora_fp8": Method("leanlora DyLoRA (nested), fp8 base", "leanlora", axes=("fp8", "nested")),
    "lean_vblora_fp8": Method("leanlora VB-LoRA (bank), fp8 base", "leanlora", axes=("fp8", "bank")),
    "lean_blora_fp8": Method("leanlora B-LoRA (gated + learned bits), fp8 base", "leanlora",
                             axes=("fp8", "gated", "learned")),
    "lean_qlora_f8": Method("leanlora QLoRA (nf4), fp8 GEMMs", "leanlora", axes=("nf4",),
                            overrides={"nf4": {"gemm": "fp8"}}),
    "lean_qdylora_f8": Method("leanlora QDyLoRA (nf4 + nested), fp8 GEMMs", "leanlora", axes=("nf4", "nested"),
                              overrides={"nf4": {"gemm": "fp8"}}),
    "lean_combo_f8": Method("leanlora bank + gated + learned on nf4, fp8 GEMMs", "leanlora",
                            axes=("nf4", "bank", "gated", "learned"), overrides={"nf4": {"gemm": "fp8"}}),
    # Gate locations start at 6.0 and close below about -0.94: ~7 units of travel, at about
    # gate_lr per Adam step, halved on average by the linear decay. The default 1e-2 needs ~1,400
    # steps; runs of a few hundred steps need ~5e-2 for the prior to act at all.
    "lean_blora_short": Method("leanlora B-LoRA, gate lr 5e-2 (short runs)", "leanlora", axes=("gated", "learned"),
                               overrides={"gates": {"lr": 5e-2}}),
    # Runs of 500-800 steps (the quality benchmark's GLUE schedule): gates start to close without
    # the prior overtaking the task (MRPC, 3 seeds: BENCHMARKS section 2b).
    "lean_blora_mid": Method("leanlora B-LoRA, gate lr 2.5e-2", "leanlora", axes=("gated", "learned"),
                             overrides={"gates": {"lr": 2.5e-2}}),
    # VB-LoRA on RTE stays under LoRA at 1x-4x the steps: these screen the knobs that keep its stored size.
    "lean_vblora_len64": Method("leanlora VB-LoRA, vectors of length 64", "leanlora", axes=("bank",),
                                overrides={"bank": {"vector_length": 64}}),
    "lean_vblora_logits3e2": Method("leanlora VB-LoRA, logits lr 3e-2", "leanlora", axes=("bank",),
                                    overrides={"bank": {"logits_lr": 3e-2}}),
    "lean_vblora_logits1e1": Method("leanlora VB-LoRA, logits lr 1e-1", "leanlora", axes=("bank",),
                                    overrides={"bank": {"logits_lr": 1e-1}}),
    "lean_vblora_bank5e3": Method("leanlora VB-LoRA, bank lr 5e-3", "leanlora", axes=("bank",),
                                  overrides={"bank": {"bank_lr": 5e-3}}),
    "lean_vblora_init05": Method("leanlora VB-LoRA, bank init range 0.05", "leanlora", axes=("bank",),
                                 overrides={"bank": {"bank_init_range": 0.05}}),
    "lean_vblora_len64_logits3e2": Method("leanlora VB-LoRA, length 64, logits lr 3e-2", "leanlora", axes=("bank",),
                                          overrides={"bank": {"vector_length": 64, "logits_lr": 3e-2}}),
    "lean_vblora_256": Method("leanlora VB-LoRA, bank of 256 vectors (over its stored-size bound: a capacity probe)",
                              "leanlora", axes=("bank",), overrides={"bank": {"num_vectors": 256}}),
    "lean_qdylora_full25": Method("leanlora QDyLoRA, a quarter of the steps at the full rank", "leanlora",
                                  axes=("nf4", "nested"), overrides={"nested": {"full_share": 0.25}}),
    # the NF4 base costs RTE about 3 points on MiniLM (QLoRA against LoRA): does a finer absmax block recover it?
    "lean_qlora_b32": Method("leanlora QLoRA, NF4 blocks of 32", "leanlora", axes=("nf4",),
                             overrides={"nf4": {"block_size": 32}}),
    "lean_qlora_b16": Method("leanlora QLoRA, NF4 blocks of 16", "leanlora", axes=("nf4",),
                             overrides={"nf4": {"block_size": 16}}),
    "lean_qdylora_b16": Method("leanlora QDyLoRA, NF4 blocks of 16", "leanlora", axes=("nf4", "nested"),
                               overrides={"nf4": {"block_size": 16}}),
    "lean_combo": Method("leanlora bank + gated + learned on nf4", "leanlora",
                         axes=("bank", "gated", "learned", "nf4")),
}
# Each method as a user who sets only its axes gets it: the base (and an NF4 base's GEMMs) left to
# the library's choice (leanlora.base.choice), where every row above names its own.
METHODS.update({f"{name}_auto": Method(f"{METHODS[name].name}, library's base choice", "leanlora",
                                       axes=(*METHODS[name].axes, "auto"))
                for name in ("lean_lora", "lean_qlora", "lean_dylora", "lean_qdylora", "lean_vblora", "lean_blora",
                             "lean_combo")})


def unavailable(method: Method) -> str | None:
    """Why the method cannot run in this tree / environment, or None when it can."""
    needed = [_AXIS_MODULES[a] for a in method.axes]
    if method.library == "leanlora" and "nf4" in method.axes:
        needed.append("torchao")
    if method.kind == "qlora":
        needed.append("bitsandbytes")
    if method.liger:
        needed.append("liger_kernel.transformers")
    for mod in needed:
        try:
            importlib.import_module(mod)
        except Exception as err:  # ImportError, or a half-landed module failing at import
            return f"{mod} not importable ({type(err).__name__}: {str(err)[:120]})"
    return None


@dataclass(frozen=True)
class Shape:
    """Adapter hyper-parameters shared by every method of one benchmark."""

    targets: tuple[str, ...]
    r: int = 16
    alpha: float = 32.0
    bank_vectors: int = 256
    bank_length: int | str = 256  # or "auto" (leanlora rows)
    topk: int = 2
    adalora_target_r: int = 8
    total_step: int = 1000
    modules_to_save: tuple[str, ...] = ()
    adapter_dtype: str = "float32"


def leanlora_config(method: Method, shape: Shape):
    import leanlora
    from leanlora.config import NF4Config

    # each row's base is what its name says; only the "auto" axis leaves it to the library's choice
    kw: dict[str, Any] = dict(target_modules=shape.targets, r=shape.r, alpha=shape.alpha,
                              modules_to_save=shape.modules_to_save, adapter_dtype=shape.adapter_dtype,
                              base="auto" if "auto" in method.axes else "dense",
                              nf4=NF4Config(gemm="auto" if "auto" in method.axes else "dequant"))
    if "bank" in method.axes:
        kw["factors"] = "bank"
    if "bank" in method.axes and shape.bank_vectors:  # 0: the library's default bank
        kw["bank"] = leanlora.BankConfig(num_vectors=shape.bank_vectors, vector_length=shape.bank_length,
                                         topk=shape.topk)
    if "nested" in method.axes:
        kw["ranks"] = "nested"
    if "gated" in method.axes:
        kw["ranks"] = "gated"
    if "learned" in method.axes:
        kw["precision"] = "learned"
    if "nf4" in method.axes:
        kw["base"] = "nf4"
    if "fp8" in method.axes:
        kw["base"] = "fp8"
    for key, value in method.overrides.items():  # a dict edits the default sub-config of that name
        kw[key] = dataclasses.replace(getattr(leanlora.AdapterConfig(), key), **value) if isinstance(value, dict) else value
    return leanlora.AdapterConfig(**kw)


def peft_config(method: Method, shape: Shape, task_type: str):
    import peft

    common = dict(target_modules=list(shape.targets), task_type=task_type,
                  modules_to_save=list(shape.modules_to_save) or None)
    if method.kind in ("lora", "qlora"):
        return peft.LoraConfig(r=shape.r, lora_alpha=shape.alpha, lora_dropout=0.0, **common)
    if method.kind == "vblora":
        return peft.VBLoRAConfig(r=shape.r, num_vectors=shape.bank_vectors, vector_length=shape.bank_length,
                                 topk=shape.topk, save_only_topk_weights=True, **common)
    if method.kind == "adalora":
        return peft.AdaLoraConfig(init_r=shape.r, target_r=shape.adalora_target_r, lora_alpha=shape.alpha,
                                  total_step=shape.total_step, tinit=shape.total_step // 10,
                                  tfinal=shape.total_step // 5, **common)
    raise ValueError(f"unknown PEFT kind {method.kind!r}; allowed: lora, qlora, vblora, adalora")


def to_bnb_nf4(model: nn.Module, targets: tuple[str, ...], compute_dtype: torch.dtype) -> nn.Module:
    """Swap target nn.Linear layers for bitsandbytes Linear4bit (NF4, double-quantized), in place.

    This is what ``from_pretrained(..., BitsAndBytesConfig(load_in_4bit=True))`` builds, done on a
    randomly initialised model; the flag ``is_loaded_in_4bit`` tells PEFT to dispatch its QLoRA layer.
    """
    import bitsandbytes as bnb

    for name, mod in list(model.named_modules()):
        if not (isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets):
            continue
        q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                              device="meta")
        q.weight = bnb.nn.Params4bit(mod.weight.data.contiguous(), requires_grad=False,
                                     compress_statistics=True, quant_type="nf4")
        if mod.bias is not None:
            q.bias = nn.Parameter(mod.bias.data, requires_grad=False)
        q = q.to(mod.weight.device)  # Params4bit quantizes on its first move to the device
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, q)
    model.is_loaded_in_4bit = True
    return model


def apply(method: Method, model: nn.Module, shape: Shape, task_type: str, dtype: torch.dtype, lr: float = 1e-4):
    """Adapt ``model`` in place; returns (model, optimizer param groups, per-step hook or None)."""
    if method.library == "leanlora":
        import leanlora

        leanlora.inject(model, leanlora_config(method, shape))
        groups = leanlora.param_groups(model, lr=lr)  # role lrs (bank, logits, gates) from the config
        return model, groups, None
    import peft

    if method.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(model=model)  # rope, rms_norm, swiglu, fused_linear_cross_entropy
    if method.kind == "qlora":
        to_bnb_nf4(model, shape.targets, dtype)
    model = peft.get_peft_model(model, peft_config(method, shape, task_type), **method.peft_kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    hook = None
    if method.kind == "adalora":
        def hook(step: int, model=model) -> None:  # after backward, before zero_grad (PEFT's contract)
            model.base_model.update_and_allocate(step)
    return model, [{"params": params, "lr": lr}], hook


def trainable_count(model: nn.Module) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


ADAMW_IMPLS = ("foreach", "fused", "leanlora", "compiled")


def adamw_step(groups: list[dict], impl: str, lr: float = 1e-4):
    """(AdamW over ``groups``, its step function) for one implementation: torch's foreach or fused,
    "leanlora" (:func:`leanlora.optim.adamw`, what its loop builds: fused on CUDA), or "compiled": ``torch.compile`` of the step, PyTorch's compiled-optimizer recipe (learning rates
    as 0-d tensors so a scheduler does not recompile; ``capturable`` on CUDA, as the compiled update
    keeps its step counters on the device)."""
    if impl not in ADAMW_IMPLS:
        raise SystemExit(f"AdamW implementation {impl!r}: allowed {', '.join(ADAMW_IMPLS)}")
    if impl == "leanlora":
        from leanlora.optim import adamw

        opt = adamw([dict(g) for g in groups], lr=lr)
        return opt, opt.step
    if impl != "compiled":
        opt = torch.optim.AdamW([dict(g) for g in groups], lr=lr, **{impl: True})
        return opt, opt.step
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    opt = torch.optim.AdamW([{**g, "lr": torch.tensor(float(g.get("lr", lr)))} for g in groups],
                            lr=torch.tensor(lr), **({"capturable": True} if on_cuda else {}))
    return opt, torch.compile(opt.step, fullgraph=False)
