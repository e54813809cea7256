"""Each benchmark row in a fresh Python process.

A host-bound step is sensitive to what the process did before it: on an H200 the same two
compiled MiniLM loops measured 0.70x or 1.34x of each other depending on which ran first in one
process, and 1.05x in fresh processes (BENCHMARKS.md section 1g). A row run here inherits no
compiled code, caches, allocator state or garbage from another row.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def row_in_fresh_process(script: str, argv: list[str], row: str, own_flags: tuple[str, ...] = (),
                         folder: Path | None = None, parent_only: tuple[str, ...] = ()) -> dict:
    """``script`` run again with ``argv`` for ``row`` alone (``--rows row --out <file> *own_flags``;
    the options in ``parent_only`` are left out):
    the row's JSON result, or an ``error`` row holding the child's last output. The child writes
    into ``folder`` when given (what it leaves beside its results, e.g. a failed kernel's source,
    stays there), else into a temporary folder. Its row file is removed once read, since the caller
    records the row: a folder that goes back from a GPU machine holds few files."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(folder or scratch) / f"row_{row.replace('@', '_')}.jsonl"
        out.unlink(missing_ok=True)
        child = [sys.executable, "-u", script, *without(argv, ("--rows", "--out", *parent_only)), *own_flags,
                 "--rows", row, "--out", str(out)]
        done = subprocess.run(child, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        rows = [r for r in map(json.loads, out.read_text().splitlines()) if "row" in r] if out.is_file() else []
        if rows:
            out.unlink()
            return rows[0]
        return {"row": row, "method": row, "error": f"child exited {done.returncode}: {done.stdout[-300:]}"}


def without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` less the named options and their values (both "--opt v" and "--opt=v")."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not arg.startswith(tuple(o + "=" for o in options)):
            kept.append(arg)
    return kept
