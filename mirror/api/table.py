"""The v2 API as data: one route table; handlers live in one module per API area."""

from mirror.api import base, blobs, catalog, manifests, peers, referrers, tags, uploads
from mirror.api.endpoints import Endpoint, get

# Names have several components, so `{name:.+}`: the handler validates it against the grammar
# and answers NAME_INVALID rather than a bare 404. Upload routes come before blob routes.
NAME = "/v2/{name:.+}"
ROUTES: list[Endpoint] = [
    *get("/v2/", base.ping, "base", "base"),
    *get("/v2/_catalog", catalog.catalog, "catalog", "catalog"),
    *get(f"{NAME}/tags/list", tags.list_tags, "tags", "pull"),
    *get(f"{NAME}/manifests/{{reference}}", manifests.get_manifest, "manifests", "pull"),
    Endpoint("PUT", f"{NAME}/manifests/{{reference}}", manifests.put_manifest, "manifests", "push"),
    Endpoint("DELETE", f"{NAME}/manifests/{{reference}}", manifests.delete_manifest, "manifests", "delete"),
    # Every step of an upload needs push, its status and cancel too.
    Endpoint("POST", f"{NAME}/blobs/uploads/", uploads.start_upload, "uploads", "push"),
    Endpoint("POST", f"{NAME}/blobs/uploads", uploads.start_upload, "uploads", "push"),
    *get(f"{NAME}/blobs/uploads/{{upload_id}}", uploads.upload_status, "uploads", "push"),
    Endpoint("PATCH", f"{NAME}/blobs/uploads/{{upload_id}}", uploads.upload_chunk, "uploads", "push"),
    Endpoint("PUT", f"{NAME}/blobs/uploads/{{upload_id}}", uploads.finish_upload, "uploads", "push"),
    Endpoint("DELETE", f"{NAME}/blobs/uploads/{{upload_id}}", uploads.cancel_upload, "uploads", "push"),
    *get(f"{NAME}/blobs/{{digest}}", blobs.get_blob, "blobs", "pull"),
    Endpoint("DELETE", f"{NAME}/blobs/{{digest}}", blobs.delete_blob, "blobs", "delete"),
    *get(f"{NAME}/referrers/{{digest}}", referrers.list_referrers, "referrers", "pull"),
    # replicas following each other's fetches (redis:): signed with http.secret, checked by the handler
    *get("/_mirror/flights/{digest}", peers.peer_flight, "peers", "peer"),
]
