"""JSON documents from clients and upstreams (manifests, image configs, token answers), parsed with
a nesting limit. Python's json recurses once per level and raises RecursionError near 1,000
levels (a 500, and a deep stack on the way); a document nested deeper than any real one is refused
before the parser sees it, as invalid JSON is."""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 64  # an OCI index nests 4 deep (index, manifests, descriptor, platform or annotations)
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_OPEN = frozenset(b"[{")


class TooDeep(ValueError):
    """The document nests arrays and objects deeper than MAX_DEPTH."""


def too_deep(body: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether arrays and objects nest deeper than `limit` (brackets inside strings do not count).
    One pass over the brackets, stopping at the first level past the limit: cheaper than parsing."""
    depth = 0
    for c in _STRING.sub(b"", body).translate(None, _NOT_BRACKETS):
        if c in _OPEN:
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def loads(body: bytes, limit: int = MAX_DEPTH) -> Any:
    """json.loads, refusing (TooDeep, a ValueError) a document nested deeper than `limit`."""
    if too_deep(body, limit):
        raise TooDeep(f"JSON nested deeper than {limit} levels")
    return json.loads(body)
