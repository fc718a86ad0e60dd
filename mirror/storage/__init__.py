"""Storage behind one small async interface (base.py); backends: filesystem, and Aliyun OSS with a
local hot tier in front (tier.py)."""

from __future__ import annotations

from mirror.config import Config
from mirror.storage.base import NotFound, Observed, Observer, Stat, Storage, StorageUnavailable, Writer
from mirror.storage.filesystem import FilesystemStorage
from mirror.storage.oss import OssStorage
from mirror.storage.tier import HotTier

__all__ = ["NotFound", "Stat", "Storage", "StorageUnavailable", "Writer", "open_storage"]


def open_storage(config: Config, observe: Observer | None = None) -> Storage:
    """The configured backend: the filesystem, or the OSS bucket (its calls seen by `observe`)
    behind a local hot tier."""
    oss = config.storage.oss
    if oss is None:
        return FilesystemStorage(config.storage.rootdirectory)
    local = config.cache.local_dir(config.storage)
    tier = local / "_tier"
    staging = tier / "_staging" if config.cache.hot_size > 0 else local / "_staging"
    bucket: Storage = OssStorage(oss, staging)
    if observe is not None:
        bucket = Observed(bucket, observe)
    return HotTier(bucket, tier, config.cache.hot_size) if config.cache.hot_size > 0 else bucket
