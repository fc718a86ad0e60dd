"""The v2 API as data: one route table; handlers live in one module per API area."""

from aiohttp import web

from mirror.api import base, blobs, catalog, manifests, referrers, tags, uploads

# Names have several components, so `{name:.+}`: the handler validates it against the grammar
# and answers NAME_INVALID rather than a bare 404. Upload routes come before blob routes.
NAME = "/v2/{name:.+}"
ROUTES = [
    web.get("/v2/", base.ping),
    web.get("/v2/_catalog", catalog.catalog),
    web.get(f"{NAME}/tags/list", tags.list_tags),
    web.get(f"{NAME}/manifests/{{reference}}", manifests.get_manifest),
    web.put(f"{NAME}/manifests/{{reference}}", manifests.put_manifest),
    web.delete(f"{NAME}/manifests/{{reference}}", manifests.delete_manifest),
    web.post(f"{NAME}/blobs/uploads/", uploads.start_upload),
    web.post(f"{NAME}/blobs/uploads", uploads.start_upload),
    web.get(f"{NAME}/blobs/uploads/{{upload_id}}", uploads.upload_status),
    web.patch(f"{NAME}/blobs/uploads/{{upload_id}}", uploads.upload_chunk),
    web.put(f"{NAME}/blobs/uploads/{{upload_id}}", uploads.finish_upload),
    web.delete(f"{NAME}/blobs/uploads/{{upload_id}}", uploads.cancel_upload),
    web.get(f"{NAME}/blobs/{{digest}}", blobs.get_blob),
    web.delete(f"{NAME}/blobs/{{digest}}", blobs.delete_blob),
    web.get(f"{NAME}/referrers/{{digest}}", referrers.list_referrers),
]


def area(request: web.Request) -> str | None:
    """The area that answered: the API module (manifests, blobs, uploads, ...) or `ui`; None for no
    route or another handler (/metrics)."""
    if request.match_info.http_exception is not None:
        return None
    module = getattr(request.match_info.handler, "__module__", "")
    if module.startswith("mirror.api."):
        return module.rsplit(".", 1)[-1]
    return "ui" if module.startswith("mirror.ui") else None
