"""The OCI error table: every error code registered once with its HTTP status.

Code raises `RegistryError`; one middleware (mirror/app.py) writes `{"errors": [...]}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ErrorCode:
    code: str
    status: int
    message: str


def _table(*codes: ErrorCode) -> dict[str, ErrorCode]:
    return {c.code: c for c in codes}


# Codes and statuses from the OCI distribution spec and distribution's errcode package.
CODES = _table(
    ErrorCode("BLOB_UNKNOWN", 404, "blob unknown to registry"),
    ErrorCode("BLOB_UPLOAD_INVALID", 400, "blob upload invalid"),
    ErrorCode("BLOB_UPLOAD_UNKNOWN", 404, "blob upload unknown to registry"),
    ErrorCode("DIGEST_INVALID", 400, "provided digest did not match uploaded content"),
    ErrorCode("MANIFEST_BLOB_UNKNOWN", 404, "manifest references a manifest or blob unknown to registry"),
    ErrorCode("MANIFEST_INVALID", 400, "manifest invalid"),
    ErrorCode("MANIFEST_UNKNOWN", 404, "manifest unknown to registry"),
    ErrorCode("NAME_INVALID", 400, "invalid repository name"),
    ErrorCode("NAME_UNKNOWN", 404, "repository name not known to registry"),
    ErrorCode("SIZE_INVALID", 400, "provided length did not match content length"),
    ErrorCode("TAG_INVALID", 400, "manifest tag did not match URI"),
    ErrorCode("UNAUTHORIZED", 401, "authentication required"),
    ErrorCode("DENIED", 403, "requested access to the resource is denied"),
    ErrorCode("UNSUPPORTED", 405, "the operation is unsupported"),
    ErrorCode("TOOMANYREQUESTS", 429, "too many requests"),
    ErrorCode("PAGINATION_NUMBER_INVALID", 400, "invalid number of results requested"),
    ErrorCode("RANGE_INVALID", 416, "invalid content range"),
    ErrorCode("UNKNOWN", 500, "unknown error"),
    # Not in the spec; distribution has no code for these either. Clients only read the status.
    ErrorCode("UPSTREAM_UNAVAILABLE", 502, "upstream registry unavailable"),
    ErrorCode("UNAVAILABLE", 503, "service unavailable"),
    ErrorCode("NOT_FOUND", 404, "no such API endpoint"),
    ErrorCode("TOO_LARGE", 413, "payload too large"),
    ErrorCode("STORAGE_FULL", 507, "storage full"),  # WebDAV's Insufficient Storage: the write may work later
    ErrorCode("TLS_REQUIRED", 400, "client sent an HTTP request to an HTTPS server"),
)


class RegistryError(Exception):
    """An error a client sees as one OCI error entry with the code's HTTP status."""

    def __init__(
        self,
        code: str,
        message: str | None = None,
        detail: Any = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.error = CODES[code]
        self.message = message or self.error.message
        self.detail = detail
        self.headers = headers or {}
        super().__init__(f"{code}: {self.message}")

    @property
    def code(self) -> str:
        return self.error.code

    @property
    def status(self) -> int:
        return self.error.status

    def body(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            entry["detail"] = self.detail
        return {"errors": [entry]}
