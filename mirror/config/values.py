"""Value parsers (durations, sizes, addresses) and `Section`, the typed reader of one YAML mapping."""

from __future__ import annotations

import re
from typing import Any

from mirror.config.model import ConfigError

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any, key: str) -> float:
    """Go-style durations (`168h`, `1h30m`, `500ms`; also `30d`) or plain seconds -> seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration like 10s or 168h, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    if text == "0":  # Go accepts a bare 0
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ConfigError(f"{key}: expected a duration like 10s or 168h, got {value!r}")
    return total


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
               "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_size(value: Any, key: str) -> int:
    """`64MiB`, `50GiB`, `1g`, or plain bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _SIZE.fullmatch(str(value).strip())
    unit = m.group(2).lower().removesuffix("b") if m else None
    if not m or unit not in _SIZE_UNITS:
        raise ConfigError(f"{key}: expected a size like 64MiB or 50GiB, got {value!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_addr(value: Any, key: str) -> tuple[str, int]:
    """`:5000`, `0.0.0.0:5000`, `[::1]:5000` -> (host, port)."""
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: expected host:port or :port, got {value!r}")
    return host.strip("[]"), int(port)


class Section:
    """One mapping of the YAML: typed getters that consume keys, then `done()` refuses leftovers."""

    def __init__(self, raw: Any, path: str) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(raw).__name__}")
        self.raw = dict(raw)
        self.path = path

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return name in self.raw

    def take(self, name: str, default: Any = None) -> Any:
        return self.raw.pop(name, default)

    def section(self, name: str) -> Section:
        return Section(self.take(name), self.key(name))

    def string(self, name: str, default: str | None = None) -> str | None:
        value = self.take(name, default)
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{self.key(name)}: expected a string, got {value!r}")

    def required(self, name: str, why: str) -> str:
        value = self.string(name)
        if not value:
            raise ConfigError(f"{self.key(name)}: {why}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self.take(name, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(name)}: expected true or false, got {value!r}")
        return value

    def integer(self, name: str, default: int, minimum: int = 0) -> int:
        value = self.take(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{self.key(name)}: expected an integer >= {minimum}, got {value!r}")
        return value

    def duration(self, name: str, default: float) -> float:
        return parse_duration(self.take(name, default), self.key(name))

    def strings(self, name: str) -> tuple[str, ...]:
        """A list, or one string of comma-separated items (what a `REGISTRY_*` variable can carry)."""
        value = self.take(name, [])
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.key(name)}: expected a list of strings, got {value!r}")
        return tuple(value)

    def ignore(self, *names: str) -> None:
        """registry:2 keys that change nothing here (e.g. storage.cache: we always cache in memory)."""
        for name in names:
            self.raw.pop(name, None)

    def refuse(self, *names: str, why: str) -> None:
        """registry:2 keys we do not implement and must not silently skip (auth, TLS)."""
        for name in names:
            if name in self.raw:
                raise ConfigError(f"{self.key(name)}: not supported by this version of mirror ({why})")

    def done(self) -> None:
        if self.raw:
            name = sorted(self.raw, key=str)[0]
            raise ConfigError(f"{self.key(str(name))}: unknown configuration key")

