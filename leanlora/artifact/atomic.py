"""Crash-safe writes: a file or a whole folder appears complete or not at all.

A file is written to a temporary name in its folder, fsynced and renamed over the target. A
folder of several files (an adapter: config + tensors) is built in a hidden sibling folder,
fsynced, and then swapped in by one rename: a kill at any moment leaves either the old folder
or the new one, never a folder holding some of the new files. Replacing an existing folder uses
Linux's atomic exchange (``renameat2(RENAME_EXCHANGE)``); where that is unavailable, two renames
leave a window of microseconds in which the old folder sits under a hidden ``.old`` name.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from leanlora.artifact.checksum import CHECKSUM_KEY, tensors_sha256

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse to open folders for fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    _write_then_rename(Path(path), lambda tmp: Path(tmp).write_bytes(data))


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors file written atomically; its metadata carries the sha256 of its tensors."""
    plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {**(metadata or {}), CHECKSUM_KEY: tensors_sha256(plain)}
    _write_then_rename(Path(path), lambda tmp: save_file(plain, tmp, metadata=metadata))


def _write_then_rename(path: Path, write) -> None:
    """``write(tmp)`` into a hidden file beside ``path``, fsync it, rename it over ``path``: a reader
    sees the old file or the new one, never half of one; the temporary file never outlives a failure."""
    _make_parent(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _make_parent(path: Path) -> None:
    """Create ``path``'s folder; where a file stands in its way, say which one (mkdir's own error
    names only the first path it tried)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path.parent, *path.parent.parents) if p.exists() and not p.is_dir()), None)
        if blocker is None:
            raise
        raise NotADirectoryError(f"{path}: cannot be written, {blocker} is a file, not a folder") from None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step; False where the OS or filesystem cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def clean_stale(target: Path) -> None:
    """Remove the hidden siblings a killed folder write left behind (``.NAME.tmp-*``, ``.NAME.old-*``)."""
    for leftover in target.parent.glob(f".{target.name}.*-*"):
        if leftover.name.startswith((f".{target.name}.tmp-", f".{target.name}.old-")) and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, owned: tuple[str, ...]) -> Iterator[Path]:
    """Yield a fresh folder to write into; on success it replaces ``target`` in one rename.

    ``owned`` names the files this writer produces. A ``target`` that already holds anything
    else (the user's own files) is not replaced as a whole: the new files are moved into it one
    by one, each atomically, so nothing of the user's is deleted. Write the files with
    :func:`atomic_write_bytes` and :func:`atomic_save_tensors`: they fsync each file.
    """
    target = Path(target)
    _make_parent(target)
    clean_stale(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        _fsync_dir(tmp)
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(f"{target}: exists and is not a folder")
        if target.is_dir() and any(p.name not in owned for p in target.iterdir()):
            for f in sorted(tmp.iterdir()):
                os.replace(f, target / f.name)
            _fsync_dir(target)
            tmp.rmdir()
            return
        if not target.exists():
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp)  # now holds the previous folder
        else:  # no atomic exchange: the old folder sits under a hidden name between two renames
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
