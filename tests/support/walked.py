"""What a walk of storage finds, per repository: the ledger's rebuild (the one walk mirror has) read
back as sets, for tests that check what a layout or a migration leaves in storage."""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mirror.ledger import rebuild, schema
from mirror.storage import Storage


@dataclass
class Walked:
    marks: set[str] = field(default_factory=set)
    manifests: set[str] = field(default_factory=set)
    layers: set[str] = field(default_factory=set)
    tags: set[str] = field(default_factory=set)

    @property
    def unmarked(self) -> bool:
        """Content no mark claims (what registry:2 wrote): the namespace decides what it is."""
        return not self.marks and bool(self.manifests or self.layers)


async def walked(storage: Storage) -> dict[str, Walked]:
    kinds = schema.Kinds(lambda name: False)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "walked.sqlite"
        await rebuild.build(storage, path, kinds, 0)
        return await asyncio.to_thread(_read, path, kinds)


def _read(path: Path, kinds: schema.Kinds) -> dict[str, Walked]:
    conn = schema.connect(path, kinds, writer=False)
    try:
        found: dict[str, Walked] = {}
        for name, marks, *_ in rebuild.facts(conn, "repositories"):
            assert isinstance(name, str) and isinstance(marks, int)
            found[name] = Walked({mark for mark, bit in schema.MARK_BITS.items() if marks & bit})
        for name, kind, digest in rebuild.facts(conn, "links"):
            repo = found.setdefault(str(name), Walked())
            (repo.manifests if kind == schema.REVISION else repo.layers).add(str(digest))
        for name, tag, _ in rebuild.facts(conn, "tags"):
            found.setdefault(str(name), Walked()).tags.add(str(tag))
        return found
    finally:
        conn.close()

