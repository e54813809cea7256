"""A seeded mutation fuzzer from the standard library, for machines without atheris.

Same shape as libFuzzer's loop without coverage feedback: take a corpus entry (or a previous
mutant), apply a few random byte mutations (flip, overwrite with a boundary value, insert,
delete, duplicate a span, splice another entry), and call the target.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

_BOUNDARY = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"0", b"-1", b"1e309",
             b"NaN", b"null", b"[]", b"{}", b'"', b"\\u0000", b"9" * 20]


def mutate(data: bytes, rng: random.Random, corpus: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        at = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            i = min(at, len(buf) - 1)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            value = rng.choice(_BOUNDARY)
            buf[at:at + len(value)] = value
        elif op == 2:
            buf[at:at] = rng.choice(_BOUNDARY)
        elif op == 3 and buf:
            del buf[at:at + rng.randint(1, 16)]
        elif op == 4 and buf:
            start = rng.randrange(len(buf))
            buf[at:at] = buf[start:start + rng.randint(1, 32)]
        elif corpus:
            other = rng.choice(corpus)
            cut = rng.randrange(len(other) + 1)
            buf[at:] = other[cut:]
    return bytes(buf)


def run(target: Callable[[bytes], None], corpus_dir: Path, iterations: int, seed: int = 0) -> int:
    """Call ``target`` on every corpus entry, then on ``iterations`` mutants; returns the calls made."""
    corpus = [p.read_bytes() for p in sorted(Path(corpus_dir).iterdir()) if p.is_file()]
    for entry in corpus:
        target(entry)
    rng = random.Random(seed)
    pool = list(corpus) or [b""]
    for _ in range(iterations):
        child = mutate(rng.choice(pool), rng, corpus)
        target(child)
        if len(pool) < 256 and rng.random() < 0.1:
            pool.append(child)
    return len(corpus) + iterations
