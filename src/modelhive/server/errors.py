"""The one place where exceptions become OpenAI error bodies.

Every error the server answers has the shape ``{"error": {"message", "type", "param", "code"}}``
and a status that says whose fault it is:

=========================================  ======  =========================  ====================
cause                                      status  type                       code
=========================================  ======  =========================  ====================
bad parameter (ours or pydantic's)         400     invalid_request_error      invalid_parameter /
                                                                              (pydantic error type)
malformed JSON, not UTF-8, or too deep     400     invalid_request_error      invalid_json
missing / wrong API key                    401     invalid_request_error      invalid_api_key
unknown model (or not on this port)        404     invalid_request_error      model_not_found
unknown route / wrong method               404/405 invalid_request_error      not_found / ...
body over the size limit                   413     invalid_request_error      request_too_large
queue full                                 429     rate_limit_error           rate_limit_exceeded
engine dead / model unhealthy              503     service_unavailable_error  service_unavailable
anything unexpected                        500     internal_server_error      internal_error
=========================================  ======  =========================  ====================

Unexpected exceptions are logged with their traceback; the client only gets one sentence.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from modelhive.errors import (
    CapacityError,
    ConfigError,
    InvalidRequestError,
    ModelhiveError,
    ModelNotFoundError,
)

log = logging.getLogger("modelhive.server")

#: pydantic adds these to a location to say which member of a union failed; they are not fields
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "null", "tuple", "literal"}


class APIError(Exception):
    """An error the server raises itself, already knowing its status, type and code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers


def error_body(message: str, type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def param_from_loc(loc: tuple | list) -> str | None:
    """``("body", "messages", 0, "content", "str")`` -> ``"messages[0].content"``."""
    parts: list[str] = []
    for item in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(item, int):
            if parts:
                parts[-1] += f"[{item}]"
            continue
        text = str(item)
        if (text.lower() in _TYPE_TAGS or "[" in text or "-" in text or text[:1].isupper()):
            continue  # a union member's tag (str, list[str], function-after[...], ChatMessage)
        parts.append(text)
    return ".".join(parts) or None


def _validation_message(err: dict[str, Any], param: str | None) -> str:
    msg = str(err.get("msg", "invalid value"))
    if param is None:
        return f"Invalid request body: {msg}"
    if err.get("type") == "missing":
        return f"'{param}' is a required parameter"
    value = err.get("input")
    shown = json.dumps(value, default=str)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"Invalid value for '{param}': {msg} (got {shown})"


def validation_error_response(errors: list[dict[str, Any]]) -> JSONResponse:
    """pydantic / FastAPI validation errors -> 400 naming the first bad parameter."""
    if not errors:
        return error_response(400, "Invalid request body", code="invalid_request")
    # a union (``str | list[str]``) reports one error per member; our own check (value_error)
    # says what is really wrong, where "should be a valid string" would mislead
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return error_response(
            400, f"The request body is not valid JSON ({ctx.get('error', 'parse error')}); "
            "send a JSON object", code="invalid_json")
    param = param_from_loc(first.get("loc", ()))
    return error_response(400, _validation_message(first, param), param=param,
                          code=str(first.get("type", "invalid_parameter")))


def unparsable_body_response(cause: BaseException) -> JSONResponse:
    """FastAPI could not decode the body (it raises a bare 400 "error parsing the body" from
    ``cause``): say which of the two usual causes it was."""
    if isinstance(cause, UnicodeDecodeError):
        message = (f"The request body is not valid UTF-8 (byte 0x{cause.object[cause.start]:02x} "
                   f"at position {cause.start}); send UTF-8 encoded JSON")
    elif isinstance(cause, RecursionError):
        message = "The request body is nested too deeply to parse; send a flatter JSON object"
    else:
        message = f"The request body could not be parsed ({type(cause).__name__}); send a JSON object"
    return error_response(400, message, code="invalid_json")


def exception_response(exc: BaseException) -> JSONResponse:
    """Any exception -> the OpenAI-shaped response it deserves (see the module table)."""
    if isinstance(exc, APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)
    if isinstance(exc, InvalidRequestError):
        return error_response(400, str(exc), param=exc.param, code="invalid_parameter")
    if isinstance(exc, ModelNotFoundError):
        return error_response(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, CapacityError):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
        if exc.status == 429:
            return error_response(429, str(exc), "rate_limit_error", code="rate_limit_exceeded",
                                  headers=headers)
        return error_response(exc.status, str(exc), "service_unavailable_error",
                              code="service_unavailable", headers=headers)
    if isinstance(exc, ConfigError):  # e.g. a model without a chat template, asked to chat
        return error_response(400, str(exc), param=exc.key, code="invalid_parameter")
    if isinstance(exc, RequestValidationError):
        return validation_error_response(list(exc.errors()))
    if isinstance(exc, ModelhiveError):
        log.error("request failed: %s", exc)
        return error_response(500, str(exc), "internal_server_error", code="internal_error")
    log.error("unexpected error while serving a request", exc_info=exc)
    return error_response(500, "The server hit an unexpected error; see its log for details",
                          "internal_server_error", code="internal_error")


def stream_error_payload(exc: BaseException) -> dict[str, Any]:
    """The ``{"error": ...}`` event that ends a stream that already started."""
    response = exception_response(exc)
    body = json.loads(bytes(response.body))
    body["error"]["status"] = response.status_code
    return body


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
               415: "unsupported_media_type"}


def install_error_handlers(app: FastAPI) -> None:
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_response(list(exc.errors()))

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:
            return unparsable_body_response(exc.__cause__)
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        if exc.status_code == 404:
            message = f"No route {request.method} {request.url.path}; see /openapi.json"
        return error_response(exc.status_code, message,
                              code=_HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}"),
                              headers=getattr(exc, "headers", None))

    async def on_exception(request: Request, exc: Exception) -> JSONResponse:
        return exception_response(exc)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(ModelhiveError, on_exception)
    app.add_exception_handler(APIError, on_exception)
    app.add_exception_handler(Exception, on_exception)
