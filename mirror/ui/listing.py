"""The web UI's repositories, read from the ledger (mirror/ledger/): a page is one indexed query in the
ledger's reading thread (filtered by name, kind and what the caller may see, sorted by name, size or
last pull), never a walk of storage or a list held in memory. A push, a delete or a first pull-through
is in the ledger when its request returns (on another replica, within the journal's poll, a second).
Last pulls are batched in memory and written with the access times (the ledger's flush)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mirror.ledger import queries
from mirror.ledger.ledger import Ledger


@dataclass(frozen=True, slots=True)
class Repository:
    name: str
    private: bool
    upstream: str | None  # the configured upstream a cached repository comes from
    size: int  # bytes of the manifests and blobs it links (shared ones count in each repository)
    manifests: int
    tags: int

    @property
    def kind(self) -> str:
        return "private" if self.private else "cached"


class Listing:
    def __init__(self, ledger: Ledger, upstream_of: Callable[[str], str | None]) -> None:
        self.ledger = ledger
        self.upstream_of = upstream_of

    def _repository(self, row: queries.Row) -> Repository:
        return Repository(row.name, row.private, None if row.private else self.upstream_of(row.name), row.size,
                          row.manifests, row.tags)

    async def page(self, q: str, kind: str, sort: str, number: int, size: int,
                   visible: queries.Visible | None) -> dict[str, Any]:
        """One page of the list (the last one if `number` is past it), with the counts it shows."""
        rows, total, listed = await self.ledger.read(queries.repositories_page, q, kind, sort, (number - 1) * size,
                                                     size, visible)
        pages = max(1, math.ceil(total / size))
        if number > pages:
            number = pages
            rows, total, listed = await self.ledger.read(queries.repositories_page, q, kind, sort,
                                                         (number - 1) * size, size, visible)
        pulled = self.ledger.last_pulled
        return {"rows": [(self._repository(r), pulled(r.name, None, r.pulled)) for r in rows], "total": total,
                "all": listed,
                "page": number, "pages": pages}

    async def repository(self, name: str) -> Repository | None:
        row = await self.ledger.read(queries.repository, name)
        return self._repository(row) if row is not None and (row.manifests or row.tags) else None

    async def last_pulled(self, name: str) -> float | None:
        row = await self.ledger.read(queries.repository, name)
        return self.ledger.last_pulled(name, None, row.pulled if row is not None else None)

    async def pulled(self, name: str, digests: list[str]) -> dict[str, float | None]:
        """When each manifest of `name` was last pulled."""
        flushed = await self.ledger.read(queries.revision_pulled, name, digests)
        return {d: self.ledger.last_pulled(name, d, flushed.get(d)) for d in digests}

    def pull(self, repository: str, digest: str) -> None:
        """A manifest GET was answered (batched into the ledger with the access times)."""
        self.ledger.pulled(repository, digest)
