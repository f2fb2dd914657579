"""Every error a caller can see, in OpenAI's error format.

Domain code raises a subclass of `GatewayError`; one exception handler in
`gateway.app` turns it into `{"error": {"message", "type", "param", "code"}}`
with the status and headers the subclass carries. Nothing else reaches a
client: an unexpected exception becomes a generic 500 with the request id and
no detail (the detail goes to the log).

    GatewayError
    ├── BadRequestError            400 invalid_request_error
    ├── AuthenticationError        401 invalid_request_error / invalid_api_key
    ├── PermissionDeniedError      403 permission_error
    ├── NotFoundError              404 invalid_request_error / model_not_found
    ├── PayloadTooLargeError       413 invalid_request_error / payload_too_large
    ├── UnprocessableError         422 invalid_request_error
    ├── RateLimitError             429 rate_limit_exceeded | insufficient_quota
    ├── ClientClosedRequestError   499 invalid_request_error / client_closed_request
    ├── UpstreamError              502 server_error / upstream_error
    ├── ServiceUnavailableError    503 server_error / service_unavailable
    └── UpstreamTimeoutError       504 server_error / upstream_timeout
"""

from __future__ import annotations

from typing import Any, ClassVar


class GatewayError(Exception):
    """Base of every user-visible error."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})

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


class BadRequestError(GatewayError):
    """The request is malformed or asks for something impossible."""

    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(GatewayError):
    """No credentials, or credentials that do not verify."""

    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        # RFC 6750: a 401 names the scheme and why, so clients can tell
        # "send a token" from "your token is bad".
        reason = "invalid_token" if code != "missing_token" else "invalid_request"
        super().__init__(
            message,
            code=code,
            headers={"www-authenticate": f'Bearer realm="tollgate", error="{reason}"'},
        )


class PermissionDeniedError(GatewayError):
    """Authenticated, but not allowed to do this."""

    status_code = 403
    error_type = "permission_error"
    default_code = "permission_denied"


class NotFoundError(GatewayError):
    """The model (or route) does not exist for this caller."""

    status_code = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class PayloadTooLargeError(GatewayError):
    """The request body is over the configured limit."""

    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


class UnprocessableError(GatewayError):
    """Well-formed JSON whose fields fail validation."""

    status_code = 422
    error_type = "invalid_request_error"


class RateLimitError(GatewayError):
    """A rate or budget is exhausted; always carries Retry-After."""

    status_code = 429
    error_type = "requests"
    default_code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        merged = dict(headers or {})
        merged["retry-after"] = str(max(1, int(retry_after_s + 0.999)))
        super().__init__(message, code=code, headers=merged)
        if error_type is not None:
            self.error_type = error_type  # type: ignore[misc]


class ClientClosedRequestError(GatewayError):
    """The client disconnected before an answer was ready (nginx's 499).

    Nobody reads the response; the status exists for logs and usage records.
    """

    status_code = 499
    error_type = "invalid_request_error"
    default_code = "client_closed_request"


class UpstreamError(GatewayError):
    """The backend answered with something unusable."""

    status_code = 502
    error_type = "server_error"
    default_code = "upstream_error"


class ServiceUnavailableError(GatewayError):
    """No backend can take the request now."""

    status_code = 503
    error_type = "server_error"
    default_code = "service_unavailable"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, code: str | None = None):
        super().__init__(
            message, code=code, headers={"retry-after": str(max(1, int(retry_after_s + 0.999)))}
        )


class UpstreamTimeoutError(GatewayError):
    """The backend did not answer in time."""

    status_code = 504
    error_type = "server_error"
    default_code = "upstream_timeout"
