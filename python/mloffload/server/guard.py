"""The ASGI layer in front of every route: the Host rule, access control, content type,
body limits, HEAD, one access-log line and the per-route request metrics.

It is plain ASGI (no BaseHTTPMiddleware) so streamed responses pass through untouched.

Two rules keep web pages out when no key is set (any page can make a browser send
requests to 127.0.0.1):
- **Host.** On a loopback bind, only requests addressed to a loopback name, the bound
  address or ``--allowed-hosts`` are answered: a page on a name an attacker points at
  127.0.0.1 ("DNS rebinding") sends its own name as Host, and gets a 403.
- **JSON.** A request that changes state (POST, PUT, PATCH, DELETE) sent by a browser
  (it says ``Origin``) must say ``Content-Type: application/json``: a page cannot send that
  across origins without a CORS preflight, which is refused unless ``--cors-origins`` names
  it. With a key, the key is the proof. Other clients may send any type (``curl -d`` sends
  a form type, and Ollama's documentation uses it); ``/v1/`` takes JSON only.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import Settings
from .backend import AccessInfo
from .errors import APIError, ErrorRenderer, openai_error
from .stats import Stats

log = logging.getLogger("mloffload.access")

OPEN_PATHS = frozenset({"/health"})
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost",
                            "ip6-loopback"})


def is_loopback(host: str) -> bool:
    """A loopback address or name (``*.localhost`` resolves to loopback by RFC 6761)."""
    name = host.strip("[]").rstrip(".").lower()
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a Host header, without port, brackets or a trailing dot."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def _from_a_web_page(scope: Scope) -> bool:
    """Whether a browser sent this on behalf of a page: browsers add ``Origin`` to every
    request that is not GET or HEAD (``null`` for sandboxed pages), and ``Sec-Fetch-Site``
    to every request; curl, scripts and editor plugins send neither."""
    site = _header(scope, b"sec-fetch-site")
    return _header(scope, b"origin") is not None or site not in (None, "none", "same-origin")


def allowed_hosts(settings: Settings) -> frozenset[str] | None:
    """The Host names answered besides loopback ones; None: any (the check is off)."""
    extra = {h.strip().lower().rstrip(".") for h in settings.allowed_hosts if h.strip()}
    if "*" in extra or (not is_loopback(settings.host) and not extra):
        return None
    return frozenset(extra | {host_name(settings.host)})


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
    def __init__(self, app: ASGIApp, *, settings: Settings, stats: Stats,
                 render: ErrorRenderer = openai_error) -> None:
        self.app = app
        self.render = render
        self.api_key = settings.api_key.encode() if settings.api_key else b""
        self.max_body = settings.max_body
        self.hosts = allowed_hosts(settings)
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = {"code": 0}
        # HEAD is GET without the body (uvicorn, which still sees HEAD, leaves it out).
        app_scope = {**scope, "method": "GET"} if scope.get("method") == "HEAD" else scope

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            receive = await self._check(scope, receive)
        except APIError as exc:
            await self.render(scope.get("path", ""), exc)(scope, receive, send_wrapper)
        else:
            await self.app(app_scope, receive, send_wrapper)
        finally:
            self._account(scope, app_scope, status["code"] or 500, time.monotonic() - started)

    def _check_host(self, scope: Scope) -> None:
        header = _header(scope, b"host")
        if self.hosts is None or header is None:  # HTTP/1.0 may send none; browsers do
            return
        name = host_name(header)
        if is_loopback(name) or name in self.hosts:
            return
        shown = name if len(name) <= 100 else name[:100] + "…"
        raise APIError(403, f"Host {shown!r} is not allowed: this server answers only "
                       "requests addressed to localhost, a loopback address or a name in "
                       "--allowed-hosts (a guard against DNS rebinding by web pages).",
                       code="host_not_allowed")

    async def _check(self, scope: Scope, receive: Receive) -> Receive:
        path = scope.get("path", "")
        self._check_host(scope)
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
        method = scope.get("method")
        if method not in STATE_CHANGING:
            return receive
        content_type = _header(scope, b"content-type")
        json_body = content_type is not None and _is_json(content_type)
        if not json_body and not self.api_key and _from_a_web_page(scope):
            raise APIError(415, f"{method} {path} from a web page needs 'Content-Type: "
                           "application/json' (or the API key): without it, any page could "
                           "make a browser send this request.", code="unsupported_media_type")
        if content_type is not None and not json_body and path.startswith("/v1/"):
            shown = content_type[:100]
            raise APIError(415, f"Unsupported Content-Type {shown!r}; send "
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

    def _account(self, scope: Scope, app_scope: Scope, status: int, seconds: float) -> None:
        route = app_scope.get("route")
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
