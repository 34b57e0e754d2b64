"""OpenAI-format errors and the FastAPI exception handlers that produce them.

Every error the server returns has the OpenAI body (which the official clients parse):

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": 400}}

`code` carries the HTTP status, as vLLM does. Bad input is always a 4xx: pydantic validation errors
become 400 (not FastAPI's 422) with `param` set to the offending field path ("messages.[0].content",
the OpenAI spelling). A 500 only ever comes from a bug; it is logged with its traceback and the body
says nothing about internals.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

# Loc entries pydantic adds for union members / wrapped validators ("str", "list[int]",
# "function-after[...]"); they are not part of the field path a user wrote.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list", "tuple", "json-or-python"})


class ParamError(ValueError):
    """A validation failure that knows which request field is at fault.

    Raised inside pydantic validators whose own location is not the field (model validators);
    `validation_error_to_openai` reads `param` back from the error context.
    """

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


class OpenAIError(Exception):
    """An error that the server returns as an OpenAI error body with HTTP `status`."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: int | str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code: int | str | None = status if code is None else code
        self.headers: dict[str, str] = dict(headers or {})

    def to_json(self) -> dict[str, Any]:
        return error_json(self.message, type=self.type, param=self.param, code=self.code)

    def to_response(self) -> JSONResponse:
        return JSONResponse(self.to_json(), status_code=self.status, headers=self.headers or None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, type={self.type!r}, param={self.param!r}, message={self.message!r})"


class BadRequestError(OpenAIError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message, status=400, type="invalid_request_error", param=param)


class AuthenticationError(OpenAIError):
    def __init__(self, message: str = "Invalid or missing API key.") -> None:
        # WWW-Authenticate tells HTTP clients which scheme to use (RFC 6750).
        super().__init__(
            message, status=401, type="authentication_error", headers={"WWW-Authenticate": "Bearer"}
        )


class NotFoundError(OpenAIError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message, status=404, type="NotFoundError", param=param)


class RateLimitError(OpenAIError):
    def __init__(
        self, message: str, *, type: str = "rate_limit_error", retry_after_s: float | None = None
    ) -> None:
        headers = {"Retry-After": str(max(1, round(retry_after_s)))} if retry_after_s is not None else None
        super().__init__(message, status=429, type=type, headers=headers)


class ServiceUnavailableError(OpenAIError):
    def __init__(
        self, message: str = "The server is not ready to serve requests.", retry_after_s: float | None = None
    ) -> None:
        headers = {"Retry-After": str(max(1, round(retry_after_s)))} if retry_after_s is not None else None
        super().__init__(message, status=503, type="service_unavailable_error", headers=headers)


class ServerShutdownError(ServiceUnavailableError):
    """A request still running when a graceful shutdown's --shutdown-timeout ran out: it is cut
    (a stream gets this as its error event) and audited with status "shutdown"."""


# ---------------------------------------------------------------------------- helpers


def error_json(
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: int | str | None = None,
) -> dict[str, Any]:
    """The OpenAI error body: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": _utf8_safe(message), "type": type,
                      "param": None if param is None else _utf8_safe(param), "code": code}}


def _utf8_safe(text: str) -> str:
    # A message that quotes user text may hold a lone surrogate, which no UTF-8 body can carry:
    # write it as its escape ("\\ud800") rather than fail the response with a 500.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_sse(err: OpenAIError) -> str:
    """An error sent inside an SSE stream whose 200 headers are already out (vLLM does the same)."""
    return f"data: {json.dumps(err.to_json())}\n\n"


def invalid_request(message: str, param: str | None = None) -> BadRequestError:
    return BadRequestError(message, param=param)


def unauthorized(message: str = "Invalid or missing API key.") -> AuthenticationError:
    return AuthenticationError(message)


def model_not_found(model: str) -> NotFoundError:
    return NotFoundError(f"The model `{model}` does not exist.", param="model")


def rate_limited(message: str = "Rate limit exceeded.", retry_after_s: float | None = None) -> RateLimitError:
    return RateLimitError(message, retry_after_s=retry_after_s)


def overloaded(
    message: str = "The server is overloaded; retry later.", retry_after_s: float | None = None
) -> RateLimitError:
    return RateLimitError(message, type="overloaded_error", retry_after_s=retry_after_s)


def unavailable(
    message: str = "The server is not ready to serve requests.", retry_after_s: float | None = None
) -> ServiceUnavailableError:
    return ServiceUnavailableError(message, retry_after_s=retry_after_s)


def _param_path(loc: Sequence[int | str]) -> str | None:
    """("body", "messages", 0, "content") -> "messages.[0].content" (OpenAI's spelling)."""
    parts: list[str] = []
    for i, item in enumerate(loc):
        if i == 0 and item in ("body", "query", "path", "header"):
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in _TYPE_TAGS or "[" in item:
            continue  # a union-member / validator tag, not a field
        else:
            parts.append(item)
    return ".".join(parts) or None


def _short_input(value: Any) -> str:
    # Echo only small scalars back: never a prompt or a message list.
    if isinstance(value, bool) or value is None or isinstance(value, (int, float)):
        return f" (got {json.dumps(value)})"
    if isinstance(value, str) and len(value) <= 40:
        return f" (got {json.dumps(value)})"
    return ""


def validation_error_to_openai(errors: Sequence[Mapping[str, Any]]) -> BadRequestError:
    """Pydantic / FastAPI validation errors -> one 400 naming the first bad field."""
    if not errors:
        return BadRequestError("Invalid request.")
    messages: list[str] = []
    first_param: str | None = None
    for i, err in enumerate(errors):
        ctx = err.get("ctx") or {}
        cause = ctx.get("error")
        if err.get("type") == "json_invalid":
            msg, param = f"Request body is not valid JSON: {ctx.get('error', err.get('msg'))}", None
        elif isinstance(cause, ParamError):
            msg, param = cause.message, cause.param
        else:
            param = _param_path(err.get("loc", ()))
            text = str(err.get("msg", "invalid value"))
            text = text.removeprefix("Value error, ")
            if err.get("type") == "missing":
                msg = f"'{param}' is a required field." if param else "A required field is missing."
            else:
                where = f"Invalid value for '{param}': " if param else ""
                msg = f"{where}{text}{_short_input(err.get('input')) if param else ''}"
        if i == 0:
            first_param = param
        if msg not in messages:
            messages.append(msg)
        if len(messages) == 5:
            break
    return BadRequestError("; ".join(messages), param=first_param)


def from_pydantic(exc: ValidationError) -> BadRequestError:
    """For callers that validate a model themselves (model_validate) instead of through FastAPI."""
    return validation_error_to_openai(exc.errors(include_url=False))


# ---------------------------------------------------------------------------- FastAPI handlers


async def openai_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OpenAIError)
    return exc.to_response()


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_error_to_openai(exc.errors()).to_response()


async def http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (unknown route 404, wrong method 405) in the OpenAI shape."""
    assert isinstance(exc, StarletteHTTPException)
    kind = {401: "authentication_error", 404: "NotFoundError", 405: "invalid_request_error"}
    err = OpenAIError(
        str(exc.detail),
        status=exc.status_code,
        type=kind.get(exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error"),
        headers=exc.headers,
    )
    return err.to_response()


async def unhandled_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    """Last resort: a bug. Logged with traceback; the client learns nothing internal."""
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    err = OpenAIError("Internal server error.", status=500, type="server_error")
    return err.to_response()


def install_exception_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OpenAIError, openai_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)
    app.add_exception_handler(Exception, unhandled_exception_handler)
