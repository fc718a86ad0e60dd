"""The v2 API as data: one route table; handlers live in one module per API area."""

from aiohttp import web

from mirror.api import base, blobs, catalog, manifests, tags

# Names have several components, so `{name:.+}`: the handler validates it against the grammar
# and answers NAME_INVALID rather than a bare 404.
ROUTES = [
    web.get("/v2/", base.ping),
    web.get("/v2/_catalog", catalog.catalog),
    web.get("/v2/{name:.+}/tags/list", tags.list_tags),
    web.get("/v2/{name:.+}/manifests/{reference}", manifests.get_manifest),
    web.get("/v2/{name:.+}/blobs/{digest}", blobs.get_blob),
]
