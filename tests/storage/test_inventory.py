"""inventory.py on registry:2's layout, on every backend: what registry:2 leaves behind (deleted links'
directories, schema 1 signatures, tag index entries) is not content; names nested under names are
counted apart; and the pieces the namespace decides with: content no mark claims, a pull-through root."""

from __future__ import annotations

from mirror.names import Digest
from mirror.storage import Storage, inventory, layout
from tests.support.walked import walked


async def put_image(storage: Storage, name: str, tag: str, seed: bytes) -> Digest:
    layer, manifest = Digest.of(seed * 10), Digest.of(b"manifest " + seed)
    await storage.put_bytes(layout.blob(layer), seed * 10)
    await storage.put_bytes(layout.blob(manifest), b"manifest " + seed)
    await storage.put_bytes(layout.layer(name, layer), layout.link(layer))
    await storage.put_bytes(layout.revision(name, manifest), layout.link(manifest))
    for key, data in layout.tag_links(name, tag, manifest):
        await storage.put_bytes(key, data)
    return manifest


async def test_registry2_leftovers_are_not_content(storage: Storage) -> None:
    kept = await put_image(storage, "app", "v1", b"a")
    gone = await put_image(storage, "app", "v2", b"b")
    # registry:2 deletes a manifest's link and leaves its directory; schema 1 signatures sit beside links
    await storage.delete(layout.revision("app", gone))
    await storage.delete(layout.tag_entry("app", "v2"))
    await storage.put_bytes(f"{layout.revisions('app')}/sha256/{kept.hex}/signatures/sha256/{'c' * 64}/link", b"x")
    assert await inventory.manifests(storage, "app") == [kept]
    assert await inventory.tag_names(storage, "app") == ["v1"]
    assert await inventory.tag_target(storage, "app", "v1") == str(kept)
    found = await walked(storage)  # and so finds the ledger's rebuild
    assert found["app"].manifests == {str(kept)} and found["app"].tags == {"v1"}


async def test_names_nested_under_names_are_counted_apart(storage: Storage) -> None:
    outer = await put_image(storage, "team/app", "v1", b"o")
    inner = await put_image(storage, "team/app/sub", "v1", b"i")
    assert await inventory.manifests(storage, "team/app") == [outer]
    assert (await walked(storage))["team/app/sub"].manifests == {str(inner)}
    names = [name for name, _ in await inventory.repository_names(storage)]
    assert names == ["team/app", "team/app/sub"]


async def test_content_no_mark_claims(storage: Storage) -> None:
    """What registry:2 wrote carries no `_mirror` mark: the namespace decides what it is."""
    await put_image(storage, "adopted", "v1", b"r")
    await put_image(storage, "pushed", "v1", b"p")
    await storage.put_bytes(layout.marker("pushed", layout.PRIVATE_MARK), b"")
    await storage.put_bytes(layout.marker("claimed", layout.PRIVATE_MARK), b"")  # claimed, nothing yet
    await storage.put_bytes(layout.upload_started("uploading", "0" * 32), layout.started_at(0))
    assert await inventory.unmarked(storage, "adopted")
    for name in ("pushed", "claimed", "uploading", "absent"):
        assert not await inventory.unmarked(storage, name), name
    found = await walked(storage)
    assert {n for n, r in found.items() if r.unmarked} == {"adopted"}


async def test_a_registry2_pull_through_root_is_told_apart(storage: Storage) -> None:
    assert not await inventory.was_pull_through_cache(storage)
    await storage.put_bytes(layout.SCHEDULER_STATE, b"{}")
    assert await inventory.was_pull_through_cache(storage)
