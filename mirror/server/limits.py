"""Limits against abuse that are not about who the caller is: upload requests in progress per
client (429 TOOMANYREQUESTS past the limit). Bodies that stall or drip are cut in mirror/api/request.py,
request header sizes by aiohttp (mirror/commands/serve.py passes limits.header_size and limits.headers)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.api.endpoints import area
from mirror.errors import RegistryError
from mirror.server.logs import USER

UPLOAD_METHODS = frozenset({"POST", "PATCH", "PUT"})


class UploadLimiter:
    """Counts upload requests in progress per client: the authenticated user, else the address."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active: dict[str, int] = {}

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method not in UPLOAD_METHODS or area(request) != "uploads":
            return await handler(request)
        client = request.get(USER) or request.remote or "?"
        count = self.active.get(client, 0)
        if count >= self.limit:
            raise RegistryError("TOOMANYREQUESTS", f"at most {self.limit} uploads at a time per client "
                                                   f"(limits.uploads_per_client)", headers={"Retry-After": "1"})
        self.active[client] = count + 1
        try:
            return await handler(request)
        finally:
            left = self.active[client] - 1
            if left:
                self.active[client] = left
            else:
                del self.active[client]
