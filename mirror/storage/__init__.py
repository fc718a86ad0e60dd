"""Storage behind one small async interface (base.py); backends: filesystem, and Aliyun OSS with a
local hot tier in front (tier.py)."""

from __future__ import annotations

import dataclasses

from mirror.config import Config
from mirror.storage.base import NotFound, Observed, Observer, Stat, Storage, StorageUnavailable, Writer
from mirror.storage.filesystem import FilesystemStorage
from mirror.storage.oss import OssStorage
from mirror.storage.space import Space, StorageFull
from mirror.storage.tier import HotTier

__all__ = ["NotFound", "Space", "Stat", "Storage", "StorageFull", "StorageUnavailable", "Writer", "open_storage",
           "without_hot_tier"]


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


def without_hot_tier(config: Config) -> Config:
    """`config` for a command that reads or writes in bulk next to a running server (export, import,
    prefetch): straight to the bucket. The hot tier's directory and its accounting belong to the
    server; a second process filling and evicting the same directory would fight it, and a backup
    must not evict what is hot."""
    return dataclasses.replace(config, cache=dataclasses.replace(config.cache, hot_size=0))
