"""The ASGI layer in front of every route: access control, body limits, content type,
one access-log line and the per-route request metrics.

It is plain ASGI (no BaseHTTPMiddleware) so streamed responses pass through untouched.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .backend import AccessInfo
from .errors import APIError, ErrorRenderer, openai_error
from .stats import Stats

log = logging.getLogger("mloffload.access")

OPEN_PATHS = frozenset({"/health"})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _is_json(content_type: str) -> bool:
    main = content_type.split(";", 1)[0].strip().lower()
    return main == "application/json" or (
        main.startswith("application/") and main.endswith("+json")
    )


class Guard:
    def __init__(self, app: ASGIApp, *, api_key: str, max_body: int, stats: Stats,
                 render: ErrorRenderer = openai_error) -> None:
        self.app = app
        self.render = render
        self.api_key = api_key.encode() if api_key else b""
        self.max_body = max_body
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = {"code": 0}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            receive = await self._check(scope, receive)
        except APIError as exc:
            await self.render(scope.get("path", ""), exc)(scope, receive, send_wrapper)
        else:
            await self.app(scope, receive, send_wrapper)
        finally:
            self._account(scope, status["code"] or 500, time.monotonic() - started)

    async def _check(self, scope: Scope, receive: Receive) -> Receive:
        path = scope.get("path", "")
        if self.api_key and path not in OPEN_PATHS and scope.get("method") != "OPTIONS":
            auth = _header(scope, b"authorization") or ""
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.api_key
            ):
                raise APIError(
                    401,
                    "Missing or incorrect API key. Send 'Authorization: Bearer <key>'.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return receive
        content_type = _header(scope, b"content-type")
        if content_type is not None and not _is_json(content_type) and path.startswith("/v1/"):
            raise APIError(415, f"Unsupported Content-Type {content_type!r}; send "
                           "'Content-Type: application/json' with a JSON body.",
                           code="unsupported_media_type")
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                raise APIError(400, "Invalid Content-Length header.",
                               code="invalid_header") from None
            if n > self.max_body:
                raise self._too_large()
            return receive
        # No length given (chunked): read up to the limit here, then replay it.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return _replay([message], receive)
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body:
                raise self._too_large()
            chunks.append(body)
            more = message.get("more_body", False)
        return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}],
                       receive)

    def _too_large(self) -> APIError:
        return APIError(413, f"Request body is larger than the limit of {self.max_body} bytes.",
                        code="request_too_large")

    def _account(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        label = getattr(route, "path", None) or "unmatched"
        self.stats.requests.labels(label, str(status)).inc()
        self.stats.duration.labels(label).observe(seconds)
        state: dict[str, Any] = scope.get("state") or {}
        # What the route and the backend noted (backend.access); never the prompt text.
        info = state.get("access")
        fields = {k: v for k, v in dataclasses.asdict(info).items() if v is not None} \
            if isinstance(info, AccessInfo) else {}
        extra = "".join(f" {k}={v}" for k, v in fields.items())
        log.info(
            "%s %s %d %.1fms%s", scope.get("method"), scope.get("path"), status, seconds * 1000,
            extra,
            extra={"method": scope.get("method"), "path": scope.get("path"), "status": status,
                   "duration_ms": round(seconds * 1000, 1), **fields},
        )


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
