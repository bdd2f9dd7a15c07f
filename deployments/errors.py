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


class ModelNotFound(AnkerError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


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


class EngineUnavailable(AnkerError):
    status = 503
    type = "service_unavailable_error"
    code = "engine_unavailable"

    def __init__(self, message: str, param: str | None = None, retry_after_s: int = 5) -> None:
        Exception.__init__(self, message, param, retry_after_s)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s


class InternalError(AnkerError):
    status = 500
    type = "server_error"
    code = "internal_error"
