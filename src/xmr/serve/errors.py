"""Errors the service answers with: each carries its HTTP status and a stable machine-readable code.

Every error response of the service has the body {"error": {"code": ..., "message": ...}}.
"""

from __future__ import annotations

from typing import Any

from xmr.errors import XmrError


class ApiError(XmrError):
    """An error meant for the HTTP client; `message` is shown to people as is."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 headers: dict[str, str] | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or type(self).code
        self.status = status or type(self).status
        self.headers = headers
        self.details = details


class BadImage(ApiError):
    status, code = 400, "invalid_image"


class InvalidInput(ApiError):
    status, code = 422, "invalid_input"


class TooLarge(ApiError):
    status, code = 413, "too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Busy(ApiError):
    status, code = 503, "busy"


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    """The JSON body of every error response."""
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return {"error": error}
