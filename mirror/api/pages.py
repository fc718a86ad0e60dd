"""`n` / `last` pagination with a `Link` header, as tags/list and _catalog need it; the pages
themselves come from the ledger (one index range each) or, for a proxied tag list, from a sorted merge.

As registry:2 does, the catalog answers 100 repositories when `n` is absent and refuses more than
1,000 (so every catalog request costs one page); a tag list answers all of one repository's tags
when `n` is absent (the OCI spec), at most 10,000 a page."""

from __future__ import annotations

from aiohttp import web
from yarl import URL

from mirror.names import parse_page_size

MAX_PAGE = 10_000
CATALOG_PAGE = 100  # registry:2's default page
CATALOG_MAX = 1000  # registry:2's catalog.maxentries default


def page_request(request: web.Request, default: int | None = None,
                 maximum: int = MAX_PAGE) -> tuple[str | None, int | None]:
    """(`last`, `n`) of a request: after which name, and at most how many (None: all)."""
    n = parse_page_size(request.query.get("n"), maximum)
    return request.query.get("last") or None, default if n is None else n


def link(request: web.Request, n: int | None, page: list[str], more: bool) -> dict[str, str]:
    """A Link header to the next page when more follow."""
    if n is None or not more or not page:
        return {}
    nxt = URL(request.path).with_query({"n": str(n), "last": page[-1]})
    return {"Link": f'<{nxt}>; rel="next"'}
