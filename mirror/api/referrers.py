import json

from aiohttp import web

from mirror.api.request import pull_route
from mirror.names import parse_digest
from mirror.registry import mediatypes


async def list_referrers(request: web.Request) -> web.Response:
    """GET /v2/<name>/referrers/<digest>[?artifactType=]: an OCI index of the manifests naming it."""
    registry, r = await pull_route(request)
    subject = parse_digest(request.match_info["digest"])
    artifact_type = request.query.get("artifactType")
    found = await registry.referrers(r, subject, artifact_type)
    headers = {"OCI-Filters-Applied": "artifactType"} if artifact_type else {}
    index = {"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX, "manifests": found}
    # The spec's exact media type: json_response would append "; charset=utf-8".
    return web.Response(body=json.dumps(index).encode(), content_type=mediatypes.OCI_INDEX, headers=headers)
