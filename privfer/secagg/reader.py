"""Bounded reading of untrusted bytes: every length is checked against the bytes present before anything is read.

Shared by the protocol messages (:mod:`privfer.secagg.messages`) and the roster certificate
(:mod:`privfer.secagg.identity`); each names the exception a short or malformed input raises.
"""

from __future__ import annotations

import struct

from privfer.secagg.errors import MalformedMessage, SecAggError


class ByteReader:
    """Big-endian fields from ``raw``; ``error`` (a SecAggError subclass taking a message) on truncation."""

    def __init__(self, raw: bytes, error: type[SecAggError] = MalformedMessage, what: str = "message") -> None:
        self.view = memoryview(raw)
        self.at = 0
        self.error = error
        self.what = what

    def take(self, n: int) -> bytes:
        if n < 0 or self.at + n > len(self.view):
            raise self.error(f"{self.what} truncated: needs {n} more bytes at offset {self.at}, has "
                             f"{len(self.view) - self.at}")
        chunk = self.view[self.at : self.at + n]
        self.at += n
        return chunk.tobytes()

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]

    @property
    def left(self) -> int:
        return len(self.view) - self.at

    def end(self) -> None:
        if self.at != len(self.view):
            raise self.error(f"{len(self.view) - self.at} trailing bytes after the {self.what}")
