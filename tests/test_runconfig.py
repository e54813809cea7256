"""Run configs: YAML + dotted overrides, complete commented YAML, errors that name key and line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from leanlora.config import AdapterConfig, ConfigError
from leanlora.train.runconfig import RunConfig, TrainConfig, load_run_config, parse_override, to_commented_yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_commented_yaml_is_complete_and_loads_back(tmp_path):
    run = RunConfig()
    text = to_commented_yaml(run)
    assert load_run_config(write(tmp_path, text)) == run
    # every field of every section is written, each preceded by its documentation
    plain = yaml.safe_load(text)
    assert set(plain["adapter"]) == set(AdapterConfig().to_dict())
    assert set(plain["adapter"]["quant"]) == set(AdapterConfig().to_dict()["quant"])
    assert "# learning rate of the adapter and head groups" in text
    assert "# rank (the maximum rank for nested and gated ranks)." in text


def test_non_default_config_round_trips(tmp_path):
    run = load_run_config(None, ["adapter.ranks=gated", "adapter.quant.bit_set=[2,4,8]", "train.lr=2e-4",
                                 "data.prompt_template=\"{question}\\nA: \"", "data.text_columns=[a, b]"])
    assert run.adapter.quant.bit_set == (2, 4, 8) and run.train.lr == 2e-4
    assert run.data.prompt_template == "{question}\nA: "
    assert load_run_config(write(tmp_path, to_commented_yaml(run))) == run


def test_sections_start_from_the_run_defaults(tmp_path):
    run = load_run_config(write(tmp_path, "adapter:\n  r: 4\ntrain:\n  lr: 2e-4\n"))
    assert run.adapter.r == 4 and run.adapter.target_modules is None   # the library's default targets
    assert run.train.lr == pytest.approx(2e-4)  # YAML 1.1 would leave "2e-4" a string


def test_peft_names_in_yaml_and_overrides(tmp_path):
    run = load_run_config(write(tmp_path, "adapter:\n  lora_alpha: 32\n  lora_dropout: 0.05\n"))
    assert run.adapter.alpha == 32 and run.adapter.dropout == 0.05
    # an override wins over the file's other spelling
    assert load_run_config(write(tmp_path, "adapter:\n  alpha: 8\n"), ["adapter.lora_alpha=64"]).adapter.alpha == 64
    with pytest.raises(ConfigError, match=r"run.yaml line 3: adapter.lora_alpha=32 is invalid: adapter.alpha=8 "
                                          r"is also given"):
        load_run_config(write(tmp_path, "adapter:\n  alpha: 8\n  lora_alpha: 32\n"))


def test_target_modules_take_peft_forms_in_yaml(tmp_path):
    assert load_run_config(None, ["adapter.target_modules=all-linear"]).adapter.target_modules == "all-linear"
    run = load_run_config(write(tmp_path, "adapter:\n  target_modules: '.*layers\\.0\\..*'\n"))
    assert run.adapter.target_modules == r".*layers\.0\..*"    # one string: a regex
    assert load_run_config(None, ["adapter.target_modules=[q_proj]"]).adapter.target_modules == ("q_proj",)
    with pytest.raises(ConfigError, match=r"run.yaml line 2: target_modules: entry '\*_proj' is a pattern"):
        load_run_config(write(tmp_path, "adapter:\n  target_modules: ['*_proj']\n"))


def test_overrides_parse_values_as_yaml():
    assert parse_override("adapter.r=8") == (["adapter", "r"], 8)
    assert parse_override("train.lr=2e-4") == (["train", "lr"], 2e-4)
    assert parse_override("adapter.target_modules=[q_proj, v_proj]")[1] == ["q_proj", "v_proj"]
    assert parse_override("model.gradient_checkpointing=true")[1] is True
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("r8")


def test_a_bare_off_turns_the_budget_and_the_fused_loss_off(tmp_path):
    """YAML 1.1 reads a bare `off` as false; where a setting's word for "none" is 'off', false means it."""
    text = "adapter:\n  ranks: gated\n  budget: off\ntrain:\n  fused_loss: off\n"
    for run in (load_run_config(write(tmp_path, text)),
                load_run_config(None, ["adapter.ranks=gated", "adapter.budget=off", "train.fused_loss=off"])):
        assert run.adapter.budget is None and run.train.fused_loss == "off"
    with pytest.raises(ConfigError, match=r"adapter.budget=True is invalid: allowed \[.auto., .off.\]$"):
        load_run_config(None, ["adapter.ranks=gated", "adapter.budget=on"])


def test_unknown_key_names_key_and_line(tmp_path):
    path = write(tmp_path, "model:\n  path: x\nadapter:\n  r: 8\n  quant:\n    bitz: 3\n")
    with pytest.raises(ConfigError, match=r"run.yaml line 6: adapter.quant: unknown key\(s\) \['bitz'\]"):
        load_run_config(path)


def test_unknown_section_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"line 3: trian: unknown section"):
        load_run_config(write(tmp_path, "adapter:\n  r: 8\ntrian:\n  lr: 1\n"))


def test_wrong_type_names_key_type_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r"line 2: train.lr: expected a number, got str 'fast'"):
        load_run_config(write(tmp_path, "train:\n  lr: fast\n"))
    with pytest.raises(ConfigError, match=r"line 3: adapter.r: expected an integer, got float"):
        load_run_config(write(tmp_path, "adapter:\n  alpha: 8\n  r: 2.5\n"))


def test_invalid_value_names_key_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r"line 2: .*r=0 is invalid: must be an integer > 0"):
        load_run_config(write(tmp_path, "adapter:\n  r: 0\n"))
    with pytest.raises(ConfigError, match=r"line 2: data.task='qa' is invalid"):
        load_run_config(write(tmp_path, "data:\n  task: qa\n"))
    with pytest.raises(ConfigError, match=r"line 2: train.compile_mode='cudagraphs' is invalid: allowed \['default', "
                                          r"'reduce-overhead'"):
        load_run_config(write(tmp_path, "train:\n  compile_mode: cudagraphs\n"))
    assert load_run_config(None, ["train.compile_mode=reduce-overhead"]).train.compile_mode == "reduce-overhead"
    with pytest.raises(ConfigError, match=r"train.compile_mode='fast' is invalid"):  # the Python API checks too
        TrainConfig(compile_mode="fast")


def test_override_errors_name_the_override(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'adapter.r=abc': adapter.r: expected an integer"):
        load_run_config(None, ["adapter.r=abc"])
    with pytest.raises(ConfigError, match=r"override 'trian.lr=1': trian: unknown section"):
        load_run_config(None, ["trian.lr=1"])
    with pytest.raises(ConfigError, match=r"override 'train.epochs=0': train.epochs=0 is invalid"):
        load_run_config(write(tmp_path, "train:\n  epochs: 2\n"), ["train.epochs=0"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(write(tmp_path, "train:\n  lr: [1\n"))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_parse(path):
    run = load_run_config(path)
    assert isinstance(run.adapter, AdapterConfig)


def test_example_configs_cover_every_method():
    runs = [load_run_config(p) for p in CONFIGS.glob("*.yaml")]
    kinds = {(r.adapter.factors, r.adapter.ranks, r.adapter.precision, r.adapter.base) for r in runs}
    assert ("dense", "fixed", "float", "dense") in kinds            # LoRA
    assert any(f == "bank" for f, *_ in kinds)                       # VB-LoRA
    assert ("dense", "nested", "float", "nf4") in kinds             # QDyLoRA
    assert ("dense", "gated", "learned", "auto") in kinds           # B-LoRA (float8 base where it pays)
    assert ("bank", "gated", "learned", "nf4") in kinds             # a combination of all three axes
