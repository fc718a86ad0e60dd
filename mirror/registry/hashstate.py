"""Hashes whose state can be saved and resumed, so an upload can continue in another process.

hashlib cannot export its state; OpenSSL's SHA256_CTX / SHA512_CTX are plain structs, so the
same libcrypto hashlib uses is called through ctypes and the context's fields are the state. It is
saved in the format registry:2 keeps in `_uploads/<id>/hashstates/<alg>/<offset>` (Go's
crypto/sha256 and crypto/sha512 `MarshalBinary`: magic, the chaining values big-endian, the
partial block, the length), so either can resume an upload the other saved. Where libcrypto is
not found, `saved()` returns None and a resume re-hashes the stored bytes instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import struct
from dataclasses import dataclass

_ALGORITHMS = {  # name -> (context size, digest size), generous for the ctx structs
    "sha256": (112, 32),
    "sha512": (216, 64),
}


@dataclass(frozen=True)
class _Shape:
    """Where OpenSSL keeps each field of one context, and Go's marshalled form of it."""

    magic: bytes  # Go's
    word: str  # struct format of one chaining value (and of OpenSSL's bit counts)
    block: int  # bytes in a block
    counts: int  # offset of OpenSSL's Nl, Nh (bits hashed, low and high words)
    data: int  # offset of the partial block
    num: int  # offset of the partial block's length

    @property
    def marshalled(self) -> int:
        return len(self.magic) + 8 * struct.calcsize(self.word) + self.block + 8


_SHAPES = {
    "sha256": _Shape(b"sha\x03", "I", 64, counts=32, data=40, num=104),
    "sha512": _Shape(b"sha\x07", "Q", 128, counts=64, data=80, num=208),
}


def _load() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("crypto")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
        for alg in ("SHA256", "SHA512"):
            for fn in ("Init", "Update", "Final"):
                getattr(lib, f"{alg}_{fn}")
    except (OSError, AttributeError):
        return None
    for alg in ("SHA256", "SHA512"):
        getattr(lib, f"{alg}_Update").argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return lib


_LIB = _load()


class ResumableHash:
    """sha256/sha512 with `update`, `hexdigest`, and `saved()` / `restore()` of its state."""

    def __init__(self, algorithm: str = "sha256") -> None:
        if algorithm not in _ALGORITHMS:
            raise ValueError(f"unsupported algorithm {algorithm}")
        self.algorithm = algorithm
        self.size = 0  # bytes hashed so far
        self._ctx: ctypes.Array[ctypes.c_char] | None = None
        self._fallback: hashlib._Hash | None = None
        if _LIB is not None:
            self._ctx = ctypes.create_string_buffer(_ALGORITHMS[algorithm][0])
            getattr(_LIB, f"{self._prefix}_Init")(self._ctx)
        else:
            self._fallback = hashlib.new(algorithm)

    @property
    def _prefix(self) -> str:
        return self.algorithm.upper()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._ctx is not None:
            view = memoryview(data)
            buf = (ctypes.c_char * view.nbytes).from_buffer_copy(view) if not isinstance(data, bytes) else data
            getattr(_LIB, f"{self._prefix}_Update")(self._ctx, buf, view.nbytes)
        else:
            assert self._fallback is not None
            self._fallback.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        if self._ctx is None:
            assert self._fallback is not None
            return self._fallback.hexdigest()
        ctx = ctypes.create_string_buffer(self._ctx.raw, len(self._ctx))  # Final consumes the context
        out = ctypes.create_string_buffer(_ALGORITHMS[self.algorithm][1])
        getattr(_LIB, f"{self._prefix}_Final")(out, ctx)
        return out.raw.hex()

    def saved(self) -> bytes | None:
        """The state in Go's `MarshalBinary` format (None where it cannot be exported)."""
        if self._ctx is None:
            return None
        shape, ctx = _SHAPES[self.algorithm], self._ctx.raw
        chaining = struct.unpack_from(f"=8{shape.word}", ctx, 0)
        pending = self.size % shape.block
        partial = ctx[shape.data:shape.data + pending].ljust(shape.block, b"\0")
        return shape.magic + struct.pack(f">8{shape.word}", *chaining) + partial + struct.pack(">Q", self.size)

    @classmethod
    def restore(cls, data: bytes) -> ResumableHash | None:
        """The hash a `saved()` (or registry:2) state continues, or None if it is not usable here."""
        algorithm = next((a for a, s in _SHAPES.items() if data.startswith(s.magic)), None)
        if _LIB is None or algorithm is None or len(data) != _SHAPES[algorithm].marshalled:
            return None
        shape = _SHAPES[algorithm]
        h = cls(algorithm)
        assert h._ctx is not None
        words = struct.calcsize(shape.word)
        at = len(shape.magic)
        chaining = struct.unpack_from(f">8{shape.word}", data, at)
        at += 8 * words
        partial = data[at:at + shape.block]
        (size,) = struct.unpack_from(">Q", data, at + shape.block)
        bits = size * 8
        ctx = bytearray(h._ctx.raw)
        struct.pack_into(f"=8{shape.word}", ctx, 0, *chaining)
        mask = (1 << (8 * words)) - 1
        struct.pack_into(f"=2{shape.word}", ctx, shape.counts, bits & mask, bits >> (8 * words))
        ctx[shape.data:shape.data + shape.block] = partial
        struct.pack_into("=I", ctx, shape.num, size % shape.block)
        ctypes.memmove(h._ctx, bytes(ctx), len(ctx))
        h.size = size
        return h
