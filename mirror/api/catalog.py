from aiohttp import web

from mirror.api.pages import paginate
from mirror.api.request import REGISTRY
from mirror.auth import visible


async def catalog(request: web.Request) -> web.Response:
    """GET /v2/_catalog?n=&last=: repositories with content here that the caller may pull."""
    page, headers = paginate(request, await visible(request, await request.app[REGISTRY].repositories()))
    return web.json_response({"repositories": page}, headers=headers)
