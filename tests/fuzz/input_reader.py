"""Turns one fuzz input (bytes) into decisions: integers in a range, choices, byte strings.

The same input always gives the same decisions, and running out of bytes gives zeros, so any
byte string is a valid input, for libFuzzer's mutations as for the stdlib fallback's.
"""

from __future__ import annotations

from typing import Any, Sequence


class InputReader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def integer(self, lo: int, hi: int) -> int:
        """An integer in lo..hi (inclusive) from up to 4 bytes."""
        span = hi - lo + 1
        value = 0
        for _ in range(min(4, max(1, (span.bit_length() + 7) // 8))):
            value = (value << 8) | self.byte()
        return lo + value % span

    def pick(self, items: Sequence[Any]) -> Any:
        return items[self.integer(0, len(items) - 1)]

    def raw(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def text(self, max_len: int = 24) -> str:
        return self.raw(self.integer(0, max_len)).decode("utf-8", errors="replace")
