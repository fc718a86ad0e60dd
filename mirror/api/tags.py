from aiohttp import web

from mirror.api.pages import link, page_request
from mirror.api.request import pull_route


async def list_tags(request: web.Request) -> web.Response:
    """GET /v2/<name>/tags/list?n=&last=."""
    registry, r = await pull_route(request)
    last, n = page_request(request)
    page, more = await registry.tags(r, last, n)
    return web.json_response({"name": request.match_info["name"], "tags": page}, headers=link(request, n, page, more))
