"""Storage behind one small async interface (base.py); backends: filesystem, and Aliyun OSS with a
local hot tier in front (tier.py)."""

from __future__ import annotations

from mirror.config import Config
from mirror.storage.base import NotFound, Stat, Storage, StorageUnavailable, Writer
from mirror.storage.filesystem import FilesystemStorage
from mirror.storage.oss import OssStorage
from mirror.storage.tier import HotTier

__all__ = ["NotFound", "Stat", "Storage", "StorageUnavailable", "Writer", "open_storage"]


def open_storage(config: Config) -> Storage:
    """The configured backend: the filesystem, or the OSS bucket behind a local hot tier."""
    oss = config.storage.oss
    if oss is None:
        return FilesystemStorage(config.storage.rootdirectory)
    local = config.cache.local_dir(config.storage)
    if config.cache.hot_size <= 0:
        return OssStorage(oss, local / "_staging")
    tier = local / "_tier"
    return HotTier(OssStorage(oss, tier / "_staging"), tier, config.cache.hot_size)
