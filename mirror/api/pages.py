"""`n` / `last` pagination with a `Link` header, as tags/list and _catalog need it."""

from __future__ import annotations

import bisect

from aiohttp import web
from yarl import URL

from mirror.names import parse_page_size

MAX_PAGE = 10_000


def paginate(request: web.Request, items: list[str]) -> tuple[list[str], dict[str, str]]:
    """The page of the sorted `items` after `last`, at most `n`, and a Link header if more remain."""
    n = parse_page_size(request.query.get("n"), MAX_PAGE)
    last = request.query.get("last")
    start = bisect.bisect_right(items, last) if last else 0
    if n is None:
        return items[start:], {}
    page = items[start:start + n]
    headers = {}
    if start + n < len(items) and page:
        nxt = URL(request.path).with_query({"n": str(n), "last": page[-1]})
        headers["Link"] = f'<{nxt}>; rel="next"'
    return page, headers
