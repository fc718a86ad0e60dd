"""Storage behind one small async interface (base.py); backends: filesystem."""

from mirror.storage.base import NotFound, Stat, Storage, Writer

__all__ = ["NotFound", "Stat", "Storage", "Writer"]
