"""Hashes whose state can be saved and resumed, so an upload can continue in another process.

hashlib cannot export its state; OpenSSL's SHA256_CTX / SHA512_CTX are plain structs, so the
same libcrypto hashlib uses is called through ctypes and the context bytes are the state. Where
libcrypto is not found, `saved()` returns None and a resume re-hashes the stored bytes instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import struct

_ALGORITHMS = {  # name -> (context size, digest size), generous for the ctx structs
    "sha256": (112, 32),
    "sha512": (216, 64),
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
_MAGIC = b"mhs1"


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
        """The state as bytes (None where it cannot be exported)."""
        if self._ctx is None:
            return None
        name = self.algorithm.encode()
        return _MAGIC + struct.pack(">BQ", len(name), self.size) + name + self._ctx.raw

    @classmethod
    def restore(cls, data: bytes) -> ResumableHash | None:
        """The hash saved by `saved()`, or None if it is not usable here (other build, corrupt)."""
        if _LIB is None or not data.startswith(_MAGIC) or len(data) < 13:
            return None
        name_len, size = struct.unpack(">BQ", data[4:13])
        algorithm = data[13:13 + name_len].decode(errors="replace")
        ctx = data[13 + name_len:]
        if algorithm not in _ALGORITHMS or len(ctx) != _ALGORITHMS[algorithm][0]:
            return None
        h = cls(algorithm)
        assert h._ctx is not None
        ctypes.memmove(h._ctx, ctx, len(ctx))
        h.size = size
        return h
