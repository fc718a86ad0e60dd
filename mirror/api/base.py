from aiohttp import web


async def ping(request: web.Request) -> web.Response:
    """GET /v2/: the API version check every client starts with."""
    return web.json_response({})
