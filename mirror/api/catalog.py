from aiohttp import web

from mirror.api.pages import CATALOG_MAX, CATALOG_PAGE, link, page_request
from mirror.api.request import REGISTRY
from mirror.auth import catalog_filter


async def catalog(request: web.Request) -> web.Response:
    """GET /v2/_catalog?n=&last=: repositories with content here that the caller may pull, one page
    of the ledger's index."""
    last, n = page_request(request, CATALOG_PAGE, CATALOG_MAX)
    page, more = await request.app[REGISTRY].catalog(last, n, catalog_filter(request))
    return web.json_response({"repositories": page}, headers=link(request, n, page, more))
