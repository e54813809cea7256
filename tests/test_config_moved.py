"""The gates and their prior have sections of their own; the keys that moved there still work.

``adapter.gates`` (lr, threshold, rank/bit init) and ``adapter.prior`` (lmbda, reg_type) are each
read in one place. Every old key (``config.MOVED_KEYS``) sets its new key with a MovedKeyWarning in
Python, YAML and overrides alike; a contradiction, or two old thresholds that became one with
different values, is refused naming the new key. Adapter files of earlier versions load silently
(``tests/test_golden.py`` loads 72 of them).
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest

import leanlora
from leanlora.config import MOVED_KEYS, AdapterConfig, ConfigError, MovedKeyWarning
from leanlora.artifact.io import read_adapter_config
from leanlora.train.runconfig import load_run_config, to_commented_yaml

GATED = dict(ranks="gated", precision="learned")
VALUES = {"gates.lr": 0.05, "gates.threshold": 0.4, "gates.rank_init_log_alpha": 2.0,
          "gates.bit_init_log_alpha": 3.0, "prior.lmbda": 0.2, "prior.reg_type": "bop"}


def _new_value(config: AdapterConfig, new: str):
    section, key = new.split(".")
    return getattr(getattr(config, section), key)


@pytest.mark.parametrize("old", sorted(MOVED_KEYS))
def test_an_old_key_sets_its_new_key_with_a_warning_naming_it(old):
    new, value = MOVED_KEYS[old], VALUES[MOVED_KEYS[old]]
    section, key = old.split(".")
    sub = {"gated": leanlora.GatedConfig, "quant": leanlora.QuantConfig}[section]
    with pytest.warns(MovedKeyWarning, match=rf"adapter\.{old} is deprecated: it is adapter\.{new} now"):
        config = AdapterConfig(**GATED, **{section: sub(**{key: value})})
    assert _new_value(config, new) == value
    assert key not in config.to_dict()[section]          # saved under the new key only
    with pytest.warns(MovedKeyWarning):
        from_dict = AdapterConfig.from_dict({**GATED, section: {key: value}})
    assert from_dict == config


def test_old_and_new_spelling_that_contradict_are_refused():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MovedKeyWarning)
        with pytest.raises(ConfigError, match=r"adapter\.gated\.gate_lr=0\.05 is invalid: adapter\.gates\.lr=0\.02 "
                                              r"is also given.*keep only adapter\.gates\.lr"):
            AdapterConfig(gates=leanlora.GatesConfig(lr=0.02), gated=leanlora.GatedConfig(gate_lr=0.05))
        # the same value twice is no contradiction
        assert AdapterConfig(prior=leanlora.PriorConfig(lmbda=0.2), quant=leanlora.QuantConfig(lmbda=0.2)).prior.lmbda == 0.2


def test_two_old_thresholds_become_one_only_where_that_is_unambiguous():
    both = {"gated": {"threshold": 0.5}, "quant": {"threshold": 0.34}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MovedKeyWarning)
        with pytest.raises(ConfigError, match=r"adapter\.gated\.threshold=0\.5 and adapter\.quant\.threshold=0\.34 "
                                              r"differ.*set adapter\.gates\.threshold instead"):
            AdapterConfig.from_dict({**GATED, **both})
        # only rank gates exist: the bit threshold never acted, the rank one is meant
        assert AdapterConfig.from_dict({"ranks": "gated", **both}).gates.threshold == 0.5
        assert AdapterConfig.from_dict({"precision": "learned", **both}).gates.threshold == 0.34
        assert AdapterConfig.from_dict(both).gates.threshold == 0.5   # no gates: neither acts


def test_a_bad_old_value_is_named_as_given():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MovedKeyWarning)
        with pytest.raises(ConfigError, match=r"^gated\.threshold=1\.5 is invalid \(it is gates\.threshold now\): "
                                              r"must be in \(0, 1\)$"):
            leanlora.GatedConfig(threshold=1.5)


def test_yaml_and_overrides_map_old_keys_and_an_override_wins_over_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("adapter:\n  ranks: gated\n  precision: learned\n  gated:\n    gate_lr: 0.05\n"
                    "  quant:\n    lmbda: 0.2\n")
    with pytest.warns(MovedKeyWarning, match="adapter.gated.gate_lr"):
        run = load_run_config(path)
    assert (run.adapter.gates.lr, run.adapter.prior.lmbda) == (0.05, 0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MovedKeyWarning)
        # the new key given on the command line replaces the file's old spelling, and the reverse
        assert load_run_config(path, ["adapter.gates.lr=0.03"]).adapter.gates.lr == 0.03
        path.write_text("adapter:\n  ranks: gated\n  gates:\n    lr: 0.02\n")
        assert load_run_config(path, ["adapter.gated.gate_lr=0.04"]).adapter.gates.lr == 0.04
        assert load_run_config(path, ["adapter.quant.threshold=0.3"]).adapter.gates.threshold == 0.3
        with pytest.raises(ConfigError, match=r"override 'adapter.gated.threshold=2'.*gated\.threshold=2\.0 is invalid"):
            load_run_config(path, ["adapter.gated.threshold=2"])


def test_print_config_shows_each_setting_once_in_its_new_section():
    import re

    text = to_commented_yaml(load_run_config(None))
    assert "\n  gates:\n" in text and "\n  prior:\n" in text and "gate_lr" not in text
    for key in ("threshold", "lmbda", "reg_type", "rank_init_log_alpha", "bit_init_log_alpha"):
        assert len(re.findall(rf"^ +{key}:", text, flags=re.M)) == 1, key
    assert not re.search(r"^ +init_log_alpha:", text, flags=re.M)


def test_the_gates_and_prior_reach_rank_and_bit_gates():
    from leanlora.build import build_layer, build_shared
    from torch import nn

    config = AdapterConfig(**GATED, r=4, gates=leanlora.GatesConfig(lr=0.05, threshold=0.3, rank_init_log_alpha=2.0,
                                                                   bit_init_log_alpha=3.0),
                           prior=leanlora.PriorConfig(reg_type="bop"))
    layer = build_layer(nn.Linear(8, 8), "x", config, build_shared(config, None))
    assert layer.ranks.threshold == layer.quant_a.threshold == 0.3
    assert layer.ranks.log_alpha.detach()[0].item() == 2.0 and layer.quant_a.log_alpha.detach()[0].item() == 3.0
    assert layer.ranks.reg_type == layer.quant_b.reg_type == "bop"


def test_an_adapter_file_with_the_old_keys_loads_without_warnings():
    from golden.make_goldens import ADAPTERS

    folder = ADAPTERS / "dense-gated-learned-dense"
    assert "gate_lr" in (folder / "leanlora_config.json").read_text()  # written before the move
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config, _ = read_adapter_config(folder)
    assert config.gates == leanlora.GatesConfig() and config.prior == leanlora.PriorConfig()
    assert dataclasses.asdict(config.gated) == {"diag": True, "nested": True, "prior": "nested"}


def test_the_command_line_names_a_moved_key_in_one_line():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "leanlora", "train", "--print-config", "adapter.gated.gate_lr=0.05"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["leanlora: warning: adapter.gated.gate_lr is deprecated: it is adapter.gates.lr now"]
    assert "\n    lr: 0.05\n" in done.stdout
