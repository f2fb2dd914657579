"""Errors the backend shows its callers, in OpenAI's error format.

ApiError
├── InvalidRequest        400 invalid_request_error
├── ModelNotFound         404 invalid_request_error / model_not_found
├── Overloaded            429 (waiting queue full), with Retry-After
└── NotReady              503 (model still loading)
"""

from __future__ import annotations

from typing import Any, ClassVar


class ApiError(Exception):
    """Base of every error a backend client can see."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.param = param
        self.headers: dict[str, str] = {}

    def body(self) -> dict[str, Any]:
        """The JSON body in OpenAI's error format."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(ApiError):
    """Malformed, unsupported or impossible request."""

    status_code = 400
    error_type = "invalid_request_error"


class ModelNotFound(ApiError):
    """The model name is not served here."""

    status_code = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class Overloaded(ApiError):
    """The waiting queue is full."""

    status_code = 429
    error_type = "server_overloaded"
    default_code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int = 1):
        super().__init__(message)
        self.headers = {"retry-after": str(retry_after_s)}


class NotReady(ApiError):
    """The engine has not finished loading."""

    status_code = 503
    error_type = "server_error"
    default_code = "not_ready"
