from aiohttp import web

from mirror.api.pages import paginate
from mirror.api.request import pull_route


async def list_tags(request: web.Request) -> web.Response:
    """GET /v2/<name>/tags/list?n=&last=."""
    registry, r = await pull_route(request)
    page, headers = paginate(request, await registry.tags(r))
    return web.json_response({"name": request.match_info["name"], "tags": page}, headers=headers)

