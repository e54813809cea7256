"""Bad inputs to the ``leanlora`` command, one row each: every one ends in a one-line
``leanlora <command>: error: ...`` naming the key, file or line, exit code 2, no traceback.

The rows run ``leanlora.cli.main`` in this process on the tiny BERT of ``train_fixtures``; a row
that needs a finished run copies one trained once for the module (nested ranks, so that the
sweep rows have something to sweep).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import minilm_dir
from leanlora.cli import main
from train_fixtures import classification_yaml, tiny_bert_dir, write_sentiment_tsv


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    cfg = classification_yaml(root, tiny_bert_dir(root, minilm_dir()), max_steps=4, save_every=2, eval_every=2,
                              batch_size=16)
    cfg.write_text(cfg.read_text().replace("  r: 4\n", "  r: 4\n  ranks: nested\n"))
    return cfg


@pytest.fixture(scope="module")
def finished(config) -> Path:
    out = config.parent / "finished"
    assert main(["train", str(config), "--out", str(out), "--no-progress"]) == 0
    return out


def _copy(run: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(run, tmp / "run"))


def _overwrite(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _fresh(cfg, tmp, *overrides):
    return ["train", str(cfg), "--out", str(tmp / "out"), "--no-progress", *overrides]


def _one_label(cfg, tmp):
    train = tmp / "one.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"a good movie {i}\t1\n" for i in range(8)))
    return _fresh(cfg, tmp, f"data.train_file={train}", "data.eval_file=")


def _not_utf8(cfg, tmp):
    train = write_sentiment_tsv(tmp / "latin1.tsv", 8, seed=3)
    lines = train.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b" ", b" caf\xe9 ", 1)  # Latin-1 e-acute on line 3
    train.write_bytes(b"\n".join(lines))
    return _fresh(cfg, tmp, f"data.train_file={train}")


def _config_not_utf8(cfg, tmp):
    bad = _overwrite(tmp / "latin1.yaml", b"# run\n# caf\xe9\n" + cfg.read_bytes())
    return ["train", str(bad), "--out", str(tmp / "out")]


def _resume_damaged(name: str, data: bytes):
    def setup(run, tmp):
        copy = _copy(run, tmp)
        target = copy / "checkpoints" / "latest.json" if name == "latest.json" else \
            next((copy / "checkpoints").glob("step-*")) / name
        _overwrite(target, data)
        return ["train", "--resume", str(copy), "--no-progress"]
    return setup


def _flip_last_value(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-4:] = b"\x7f\x7f\x7f\x7f"  # the last float becomes ~3.4e38, the length stays
    path.write_bytes(bytes(data))


def _resume_flipped(name: str):
    def setup(run, tmp):
        copy = _copy(run, tmp)
        _flip_last_value(next((copy / "checkpoints").glob("step-*")) / name)
        return ["train", "--resume", str(copy), "--no-progress"]
    return setup


def _eval_tampered(edit):
    """`eval` of a copy of the run whose adapter folder was changed by ``edit(folder)``."""
    def setup(run, tmp):
        copy = _copy(run, tmp)
        edit(copy / "adapter")
        return ["eval", str(copy)]
    return setup


def _edit_rank(folder: Path) -> None:
    import json

    from leanlora.artifact.io import CONFIG_NAME

    meta = json.loads((folder / CONFIG_NAME).read_text())
    next(iter(meta["modules"].values()))["rank"] = "x"
    (folder / CONFIG_NAME).write_text(json.dumps(meta))


def _merge_nan(run, tmp, monkeypatch):
    """A MergeError from the real merge: the loaded adapter is made NaN before `export --format merged`."""
    import torch

    import leanlora

    def poison(model):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(float("nan"))
    monkeypatch.setattr(leanlora, "finalize", poison)
    return ["export", str(run), "--format", "merged", "--out", str(tmp / "merged")]


# (id, argv builder, text the error must hold). Builders take (config, tmp) for a fresh run,
# or (finished run, tmp) / (finished run, tmp, monkeypatch) when marked "run" / "run+mp".
ROWS = [
    # 1. weights AdamW cannot train are refused before training (non-finite updates: test_finite.py)
    ("float16-factors", "cfg", lambda c, t: _fresh(c, t, "adapter.adapter_dtype=float16", "train.max_steps=1"),
     "AdamW cannot train float16 weights (the 'adapter' group holds some)"),
    # 2. non-finite settings refused at validation
    ("lr-inf", "cfg", lambda c, t: _fresh(c, t, "train.lr=.inf"), "train.lr=inf is invalid: must be a finite number"),
    ("lr-nan", "cfg", lambda c, t: _fresh(c, t, "train.lr=.nan"), "train.lr=nan is invalid"),
    ("lr-over-float32", "cfg", lambda c, t: _fresh(c, t, "train.lr=1e39"),
     "train.lr=1e+39 is invalid: must be > 0 and at most 3e+38 (optimizers use float32)"),
    ("gate-lr-over-float32", "cfg", lambda c, t: _fresh(c, t, "adapter.ranks=gated", "adapter.gates.lr=1e39"),
     "gates.lr=1e+39 is invalid: must be > 0 and at most 3e+38"),
    ("alpha-inf", "cfg", lambda c, t: _fresh(c, t, "adapter.alpha=.inf"), "'adapter.alpha=.inf': alpha=inf is invalid"),
    ("gate-lr-inf", "cfg", lambda c, t: _fresh(c, t, "adapter.gates.lr=.inf"), "gates.lr=inf is invalid"),
    ("alpha-text", "cfg", lambda c, t: _fresh(c, t, "adapter.alpha=abc"), "adapter.alpha: expected a number"),
    # 3. resume refuses what cannot change, with the reason
    ("resume-adapter-r", "run", lambda r, t: ["train", "--resume", str(_copy(r, t)), "adapter.r=8"],
     "adapter.r cannot change when resuming: the adapter's shapes"),
    ("resume-batch-size", "run", lambda r, t: ["train", "--resume", str(_copy(r, t)), "train.batch_size=4"],
     "train.batch_size cannot change when resuming"),
    ("resume-config-file", "run", lambda r, t: ["train", str(r / "run.yaml"), "--resume", str(_copy(r, t))],
     "--resume continues the run saved in the folder"),
    ("resume-too-short", "run", lambda r, t: ["train", "--resume", str(_copy(r, t)), "train.max_steps=2"],
     "give 2 steps in all, but the run resumes at step 4"),
    # 4. errors that used to escape as tracebacks
    ("inject-unknown-target", "cfg", lambda c, t: _fresh(c, t, "adapter.target_modules=[quer]"),
     "target_modules entry 'quer' matches no module"),
    ("inject-bad-regex", "cfg", lambda c, t: _fresh(c, t, "adapter.target_modules=("),
     "target_modules='(' is not a valid regular expression"),
    ("inject-save-typo", "cfg", lambda c, t: _fresh(c, t, "adapter.modules_to_save=[clasifier]"),
     "modules_to_save entry 'clasifier' matches no module"),
    ("merge-nonfinite", "run+mp", _merge_nan, "lora_B' holds NaN; refusing to merge it into the base"),
    ("data-not-utf8", "cfg", _not_utf8, "latin1.tsv line 3: byte 0xe9"),
    ("config-not-utf8", "cfg", _config_not_utf8, "latin1.yaml line 2: byte 0xe9 at column 6 is not UTF-8"),
    ("latest-json", "run", _resume_damaged("latest.json", b"{\"step\": 4, \"di"), "latest.json: not valid JSON"),
    ("latest-json-dir", "run", _resume_damaged("latest.json", b"{\"step\": 4, \"dir\": \"../..\"}"),
     "latest.json: 'dir' is '../..'"),
    ("state-json", "run", _resume_damaged("state.json", b"[1, 2"), "state.json: not valid JSON"),
    ("state-json-keys", "run", _resume_damaged("state.json", b"{\"step\": 4}"), "state.json: key(s)"),
    ("optimizer-safetensors", "run", _resume_damaged("optimizer.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
     "optimizer.safetensors: not a readable safetensors file"),
    ("checkpoint-overwritten", "run", _resume_flipped("adapter.safetensors"),
     "adapter.safetensors: its tensors do not match the sha256 stored in the file"),
    ("adapter-bytes-overwritten", "run", _eval_tampered(lambda f: _flip_last_value(next(f.glob("*.safetensors")))),
     "do not match the sha256 stored in the file"),
    ("adapter-json-edited", "run", _eval_tampered(_edit_rank), "rank: 'x' is invalid; expected an integer in 1..4"),
    ("out-unwritable", "cfg", lambda c, t: ["train", str(c), "--out", str(_overwrite(t / "a-file", b"x") / "run")],
     "--out"),
    ("sweep-rank-0", "run", lambda r, t: ["sweep", str(r), "--ranks", "0,9"], "--ranks '0,9': every rank must be"),
    ("sweep-rank-9", "run", lambda r, t: ["sweep", str(r), "--ranks", "2,9"], "9 is above the adapter's rank adapter.r=4"),
    ("sweep-rank-text", "run", lambda r, t: ["sweep", str(r), "--ranks", "a,b"],
     "--ranks 'a,b': expected comma-separated integers"),
    ("export-into-run", "run", lambda r, t: ["export", str(r), "--out", str(r)], "that is the run folder itself"),
    ("export-into-adapter", "run", lambda r, t: ["export", str(r), "--format", "leanlora", "--out", str(r / "adapter")],
     "that is inside the run's adapter/"),
    ("sweep-export-into-checkpoints", "run", lambda r, t: ["sweep", str(r), "--export", str(r / "checkpoints" / "x")],
     "that is inside the run's checkpoints/"),
    ("sweep-negative-tolerance", "run", lambda r, t: ["sweep", str(r), "--tolerance", "-1"],
     "--tolerance -1.0: must be a finite score difference >= 0"),
    ("eval-adapter-override", "run", lambda r, t: ["eval", str(r), "adapter.r=8"],
     "override 'adapter.r=8': a trained adapter's settings are read from its folder"),
    # 5. silent training mistakes
    ("one-label", "cfg", _one_label, "one.tsv (data.train_file): every labelled row has the label '1'"),
    ("one-class-labels", "cfg", lambda c, t: _fresh(c, t, "data.labels=[a]"), "data.labels=('a',) is invalid"),
    ("untrained-head", "cfg", lambda c, t: _fresh(c, t, "adapter.modules_to_save=[]"),
     "adapter.modules_to_save=[] leaves ['classifier.bias', 'classifier.weight'] untrained"),
]


@pytest.mark.parametrize("kind, build, names", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_clear_line(kind, build, names, config, finished, tmp_path, capsys, monkeypatch):
    argv = build(config, tmp_path) if kind == "cfg" else \
        build(finished, tmp_path) if kind == "run" else build(finished, tmp_path, monkeypatch)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    last = err.strip().splitlines()[-1]  # above it: transformers' loading progress, if the model loaded
    assert last.startswith(f"leanlora {argv[0]}: error: "), err
    assert "Traceback" not in err + out
    assert names in last, err


@pytest.mark.parametrize("field, value, names", [
    ("alpha", "abc", "alpha='abc' is invalid: must be a number, not a str"),
    ("dropout", "0.1", "dropout='0.1' is invalid: must be a number, not a str"),
    ("bank", {"num_vectors": 4}, "bank={'num_vectors': 4} is invalid: must be a BankConfig"),
    ("alpha", float("inf"), "alpha=inf is invalid: must be a finite number"),
    ("rslora", "no", "rslora='no' is invalid: must be true or false"),
    ("r", 4.0, "r=4.0 is invalid: must be an integer"),
])
def test_api_config_of_the_wrong_kind_is_refused_naming_the_field(field, value, names):
    from leanlora.config import AdapterConfig, ConfigError

    with pytest.raises(ConfigError) as err:
        AdapterConfig(**{field: value})
    assert names in str(err.value)


def test_labels_given_as_numbers_compare_as_text(config, tmp_path):
    """data.labels=[0,1] trains (it used to be refused with "expected a string")."""
    assert main(_fresh(config, tmp_path, "data.labels=[0,1]", "train.max_steps=1", "data.eval_file=")) == 0
    from leanlora.train.runconfig import load_run_config

    assert load_run_config(tmp_path / "out" / "run.yaml").data.labels == ("0", "1")


@pytest.mark.parametrize("points", [["--ranks", "2,9"], ["--ranks", "a"], ["--budgets", "0.1"]])
def test_sweep_points_are_checked_before_the_model_loads(points, finished, monkeypatch, capsys):
    """A mistyped --ranks (or --budgets on a nested run) costs no model load: on a real model that is
    minutes (a GGUF file is dequantized first)."""
    from leanlora.train import loop

    monkeypatch.setattr(loop, "load_for_run", lambda *a, **k: pytest.fail("the model loaded before the points"))
    assert main(["sweep", str(finished), *points]) == 2
    assert capsys.readouterr().err.startswith("leanlora sweep: error: --")
