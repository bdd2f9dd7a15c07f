"""Anker's error values: a small typed hierarchy, each knowing its OpenAI type, code and HTTP status.

They are mapped to OpenAI's wire shape in exactly one place (``deployments.openai.errors``). A message here never
quotes the request's content: only field names, counts and model names.
"""

from __future__ import annotations

from typing import ClassVar


class AnkerError(Exception):
    """Base of Anker's errors. ``args`` holds the constructor arguments, so errors pickle across Ray handles."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message, param)
        self.message = message
        self.param = param

    def __str__(self) -> str:
        return self.message


class InvalidRequest(AnkerError):
    status = 400
    type = "invalid_request_error"


class InvalidJson(InvalidRequest):
    code = "invalid_json"


class UnsupportedParameter(InvalidRequest):
    code = "unsupported_parameter"


class UnsupportedValue(InvalidRequest):
    code = "unsupported_value"


class InvalidValue(InvalidRequest):
    code = "invalid_value"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class InvalidApiKey(AnkerError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(AnkerError):
    """The key is valid but its role may not do this (a viewer calling a model, a member managing keys)."""

    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class ModelNotAllowed(AnkerError):
    """The model exists, but the key's allow-list (set by its organisation's admins) does not include it."""

    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class NotFound(AnkerError):
    """An administrative object (tenant, member, key) that does not exist or is not the caller's to see."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Conflict(AnkerError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RetryLater(AnkerError):
    """An error the client should retry after ``retry_after_s`` seconds (sent as ``Retry-After``)."""

    def __init__(self, message: str, param: str | None = None, retry_after_s: int = 5) -> None:
        Exception.__init__(self, message, param, retry_after_s)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s


class RateLimited(RetryLater):
    """Requests or tokens per minute of the key are used up; ``type`` says which, like OpenAI's."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class TokenRateLimited(RateLimited):
    type = "tokens"


class InsufficientQuota(AnkerError):
    """The tenant's or the key's budget (monthly cap or prepaid credit) is used up."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class ModelNotFound(AnkerError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    @classmethod
    def unnamed(cls) -> ModelNotFound:
        """For a name the client chose that is not a served model: its own text, so not repeated."""
        return cls("The model does not exist or you do not have access to it.", "model")


class RouteNotFound(AnkerError):
    status = 404
    type = "invalid_request_error"
    code = "unknown_url"


class MethodNotAllowed(AnkerError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTooLarge(AnkerError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class EngineUnavailable(RetryLater):
    status = 503
    type = "service_unavailable_error"
    code = "engine_unavailable"


class EngineTimeout(AnkerError):
    """The engine produced no output within its deadline (``server.request_timeout_s``, or a stream's
    ``server.stream_idle_timeout_s``): hung, or far behind. The request was aborted, and may be tried again."""

    status = 504
    type = "server_error"
    code = "engine_timeout"


class EngineOverloaded(RetryLater):
    """Every engine replica of the model is busy and the queue in front of them is full (back-pressure)."""

    status = 503
    type = "service_unavailable_error"
    code = "engine_overloaded"


class BillingUnavailable(RetryLater):
    """The billing actor cannot be reached and the request needs it (a budget to reserve, an unknown key)."""

    status = 503
    type = "service_unavailable_error"
    code = "billing_unavailable"


class InternalError(AnkerError):
    status = 500
    type = "server_error"
    code = "internal_error"
