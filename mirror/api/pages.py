"""`n` / `last` pagination with a `Link` header, as tags/list and _catalog need it; the pages
themselves come from the ledger (one index range each) or, for a proxied tag list, from a sorted merge."""

from __future__ import annotations

from aiohttp import web
from yarl import URL

from mirror.names import parse_page_size

MAX_PAGE = 10_000


def page_request(request: web.Request) -> tuple[str | None, int | None]:
    """(`last`, `n`) of a request: after which name, and at most how many (None: all)."""
    return request.query.get("last") or None, parse_page_size(request.query.get("n"), MAX_PAGE)


def link(request: web.Request, n: int | None, page: list[str], more: bool) -> dict[str, str]:
    """A Link header to the next page when more follow."""
    if n is None or not more or not page:
        return {}
    nxt = URL(request.path).with_query({"n": str(n), "last": page[-1]})
    return {"Link": f'<{nxt}>; rel="next"'}
