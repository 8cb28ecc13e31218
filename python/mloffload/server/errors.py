"""OpenAI-shaped errors: every non-2xx body is ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = logging.getLogger("mloffload.server")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    501: "not_implemented_error",
    502: "upstream_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"


class APIError(Exception):
    """Raise anywhere in a handler; it becomes the documented error response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: APIError) -> Response:
    return Response(
        orjson.dumps(exc.body()),
        status_code=exc.status,
        media_type="application/json",
        headers=exc.headers,
    )


def model_not_found(name: str) -> APIError:
    shown = name if len(name) <= 200 else name[:200] + "…"
    return APIError(
        404,
        f"The model {shown!r} does not exist. GET /v1/models lists the available models.",
        code="model_not_found",
        param="model",
    )


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # Pydantic adds the union member's type name to the location; users want the field.
    parts = [p for p in parts if p not in _UNION_TAGS and "[" not in p]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = tuple(first.get("loc", ()))
    param = _param_from_loc(loc)
    msg = str(first.get("msg", "invalid request"))
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, "The request body is not valid JSON: "
                        f"{first.get('ctx', {}).get('error', msg)}", code="invalid_json")
    if param is None and kind in ("missing", "model_attributes_type", "dict_type"):
        return APIError(400, "The request body must be a JSON object.", code="invalid_body")
    text = f"Invalid value for '{param}': {msg}" if param else msg
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return APIError(400, text, param=param, code="invalid_value")


ErrorRenderer = Callable[[str, APIError], Response]
"""(request path, error) → the error response: the OpenAI shape, or another API's on its
paths (Ollama's under /api)."""


def openai_error(_: str, exc: APIError) -> Response:
    return error_response(exc)


def install_error_handlers(app: FastAPI, render: ErrorRenderer = openai_error) -> None:
    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return render(request.url.path, exc)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return render(request.url.path, validation_error(exc))

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        messages = {404: "No such endpoint.", 405: "Method not allowed on this endpoint."}
        message = messages.get(exc.status_code, str(exc.detail))
        headers = dict(exc.headers or {})
        return render(request.url.path, APIError(exc.status_code, message, headers=headers))

    async def on_client_gone(request: Request, exc: Exception) -> Response:
        # Nobody is listening; the status only shows in our access log and metrics.
        return render(request.url.path, APIError(
            CLIENT_CLOSED_REQUEST, "Client closed the request.", code="client_closed_request",
            type="cancelled"))

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return render(request.url.path, APIError(
            500, f"Internal server error ({type(exc).__name__}); the server keeps serving.",
            code="internal_error"))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(ClientGone, on_client_gone)
    app.add_exception_handler(Exception, on_unexpected)
