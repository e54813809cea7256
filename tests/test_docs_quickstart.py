"""The Python quick starts of README.md and docs/guide.md, run as written on a tiny Llama.

Only what a reader must supply is filled in: the model folder, ``total_steps`` and ``loader``.
A name the snippet uses that the package does not give (``leanlora.optim`` without importing it,
say) fails here before it fails a reader.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12


def quick_start(doc: str, heading: str) -> str:
    """The first ```python block after ``heading`` in ``doc``."""
    text = (ROOT / doc).read_text()
    after = text[text.index(heading):]
    match = re.search(r"```python\n(.*?)```", after, re.S)
    assert match, f"{doc}: no python block after {heading!r}"
    return match.group(1)


@pytest.fixture
def tiny_llama(tmp_path) -> Path:
    torch.manual_seed(0)
    folder = tmp_path / "model"
    LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("doc, heading", [("README.md", "## Python quick start"),
                                          ("docs/guide.md", "## Quick start (Python)")])
def test_quick_start_runs_as_written(doc, heading, tiny_llama, tmp_path, monkeypatch):
    code = quick_start(doc, heading)
    assert '"path/to/local/model"' in code
    code = code.replace('"path/to/local/model"', repr(str(tiny_llama)))
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 96, (2, 8), generator=generator) for _ in range(STEPS)]
    monkeypatch.chdir(tmp_path)
    namespace = {"total_steps": STEPS, "loader": [dict(input_ids=ids, labels=ids) for ids in batches]}
    exec(compile(code, f"{doc} quick start", "exec"), namespace)

    model = namespace["model"]
    out = tmp_path / "out"
    assert (out / "adapter" / "leanlora_adapter.safetensors").is_file()
    exported = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert exported["peft_type"] == "LORA"
    import leanlora
    report = leanlora.cost_report(model)
    # the snippets ask for B-LoRA under the default budget (a quarter of LoRA-16's BOPs): the run
    # must end on it, since the budget's freeze projects the structure whatever the run's length
    assert report.total["bops_vs_lora"] == pytest.approx(0.25, rel=0.1)
