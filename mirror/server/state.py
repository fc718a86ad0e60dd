"""The application's shared state, by typed key: set by server/app.py's lifecycle steps, read by the
UI and the middlewares."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from mirror.clock import Clock
from mirror.cluster import Cluster
from mirror.config import Config
from mirror.ledger.ledger import Ledger
from mirror.server.metrics import Metrics
from mirror.storage import Storage

CONFIG = web.AppKey("config", Config)
CLOCK = web.AppKey("clock", Clock)
METRICS = web.AppKey("metrics", Metrics)
STORAGE = web.AppKey("storage", Storage)
LEDGER = web.AppKey("ledger", Ledger)
SESSION = web.AppKey("session", aiohttp.ClientSession)
CLUSTER = web.AppKey("cluster", Cluster)  # only with redis:
