"""Talking to one llama-server-like upstream: its URL, our key for it, the pooled transport.

Requests go to the transport directly, not through ``httpx.AsyncClient.send``: on a
two-core machine the client layer (cookie jar, auth and redirect hooks, none of which
llama-server needs) and httpcore's per-read cost were most of the proxy's CPU, and that CPU
is taken from llama-server's decode (bench/results/proxy.md). Plain-http URLs go through the
lean HTTP/1.1 transport in ``http1``; https keeps httpx's own.

Transport failures and the upstream's own error answers come back as ``APIError`` in
OpenAI's shape, naming the upstream by ``label`` (never by its key).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx
import orjson

from ... import __version__
from ..errors import APIError
from .http1 import HTTP1Transport

log = logging.getLogger("mloffload.server")

HEALTH_TIMEOUT = 3.0
_CLOSE = {"Connection": "close"}
_HEADERS = {"Content-Type": "application/json", "Accept": "*/*",
            "Accept-Encoding": "identity", "User-Agent": f"ml-offload/{__version__}"}

# llama-server's error types (server-common.cpp) → our codes; others keep its type as code.
_UPSTREAM_CODES = {
    "exceed_context_size_error": "context_length_exceeded",
    "not_supported_error": "not_supported",
    "invalid_request_error": "invalid_request",
    "not_found_error": "not_found",
}


def upstream_error(status: int, content: bytes, label: str, keyed: bool = False,
                   key_hint: str = "ML_OFFLOAD_LLAMACPP_API_KEY (or llamacpp_api_key_file)",
                   says: str = "llama-server") -> APIError:
    """The upstream's error answer (or anything else it sent) as our OpenAI-shaped error;
    ``says`` names who said it, in front of its own message."""
    message, utype = "", None
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        data = None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message") or "")
        utype = err.get("type") if isinstance(err.get("type"), str) else None
    elif isinstance(err, str):
        message = err
    if not message:
        text = content.decode("utf-8", "replace").strip()
        message = text[:300] or f"HTTP {status} with an empty body"
    if not 400 <= status <= 599:
        status = 502
    code = _UPSTREAM_CODES.get(utype or "", utype)
    headers: dict[str, str] = {}
    if status == 401:  # our key to the upstream, not the client's to us, is wrong
        said = "no API key was sent" if not keyed else "it refused the key we sent"
        return APIError(502, f"{label} requires an API key and {said} ({message}); set "
                        f"{key_hint} to the key it was started with.",
                        code="upstream_auth_failed")
    if status == 503:
        code = "model_loading" if "loading" in message.lower() else "backend_unavailable"
        headers["Retry-After"] = "2"
    return APIError(status, f"{says}: {message}", code=code, headers=headers)


class UpstreamClient:
    """One upstream base URL. ``label`` names it in errors ("llama-server at URL"); the URL
    must carry no credentials (the key goes in ``api_key``), so no message can leak them.
    ``says`` is put in front of the upstream's own error messages (default: llama-server)."""

    def __init__(self, url: str, api_key: str, *, label: str, request_timeout: float,
                 pool_timeout: float, hint: str = "", key_hint: str | None = None,
                 says: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.label = label
        self.says = says
        self.keyed = bool(api_key)
        self.hint = hint  # appended when it cannot be reached ("; start it, or ...")
        self.key_hint = key_hint
        self.request_timeout = request_timeout
        self._transport: httpx.AsyncBaseTransport | None = None
        self._urls: dict[str, httpx.URL] = {}
        headers = dict(_HEADERS)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._headers = httpx.Headers(headers)
        self._close_headers = httpx.Headers({**headers, **_CLOSE})
        self._timeout = httpx.Timeout(connect=5.0, read=request_timeout, write=30.0,
                                      pool=pool_timeout).as_dict()
        self.auth_error: str | None = None  # set while the upstream refuses our key
        self.on_broken: Callable[[], None] | None = None  # told when a connection fails

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        # llama-server closes idle connections after 5 s: drop ours a little earlier.
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=64,
                              keepalive_expiry=4.0)
        # No environment proxy ever sees loopback traffic.
        self._transport = HTTP1Transport(limits) if self.url.startswith("http://") else \
            httpx.AsyncHTTPTransport(limits=limits, trust_env=False)

    async def close(self) -> None:
        if self._transport is not None:
            transport, self._transport = self._transport, None
            await transport.aclose()

    @property
    def transport(self) -> httpx.AsyncBaseTransport:
        if self._transport is None:
            raise APIError(503, f"The connection to {self.label} is closed (shutting down).",
                           code="backend_unavailable")
        return self._transport

    # --- errors ---------------------------------------------------------------------------

    def broken(self) -> None:
        if self.on_broken is not None:
            self.on_broken()

    def unreachable(self, exc: BaseException) -> APIError:
        self.broken()
        detail = str(exc) or type(exc).__name__
        return APIError(503, f"{self.label} is not reachable ({detail}){self.hint}.",
                        code="backend_unavailable", headers={"Retry-After": "5"})

    def transport_error(self, exc: httpx.HTTPError) -> APIError:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return self.unreachable(exc)
        if isinstance(exc, httpx.PoolTimeout):
            return APIError(503, f"Too many requests are waiting for {self.label}.",
                            code="backend_busy", headers={"Retry-After": "5"})
        if isinstance(exc, httpx.TimeoutException):
            return APIError(504, f"{self.label} did not answer in time "
                            f"({type(exc).__name__}).", code="upstream_timeout")
        self.broken()
        return APIError(502, f"The connection to {self.label} failed: "
                        f"{exc or type(exc).__name__}.", code="upstream_error")

    def error(self, status: int, content: bytes) -> APIError:
        """The upstream's error as ours; a refused key is remembered (for /health)."""
        kw = {"key_hint": self.key_hint} if self.key_hint else {}
        if self.says:
            kw["says"] = self.says
        error = upstream_error(status, content, self.label, self.keyed, **kw)
        if error.code == "upstream_auth_failed":
            if self.auth_error is None:
                log.warning("%s", error.message)
            self.auth_error = error.message
        return error

    # --- requests -------------------------------------------------------------------------

    async def send(self, method: str, path: str, body: bytes | None = None,
                   timeout: float | None = None, last: bool = False) -> httpx.Response:
        """Send one request, streaming the answer; transport failures become APIErrors.

        ``last``: the connection's last request. llama-server closes a connection after a
        streamed answer, so one reused after a stream would fail; saying so up front keeps
        it out of the pool.
        """
        transport = self.transport
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self.url + path)
        headers = self._close_headers if last else self._headers
        ext = {"timeout": self._timeout if timeout is None else
               httpx.Timeout(timeout).as_dict()}
        req = httpx.Request(method, url, headers=headers, content=body, extensions=ext)
        for attempt in (1, 2):
            try:
                resp = await transport.handle_async_request(req)
                resp.request = req
                return resp
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                # A pooled connection that the upstream had just closed: try a fresh one once.
                if attempt == 2:
                    raise self.transport_error(exc) from None
            except httpx.HTTPError as exc:
                raise self.transport_error(exc) from None
        raise AssertionError("unreachable")

    async def get_json(self, path: str, timeout: float = HEALTH_TIMEOUT) -> Any:
        status, content = await self.get_status(path, timeout)
        if status != 200:
            raise self.error(status, content)
        try:
            return orjson.loads(content)
        except orjson.JSONDecodeError:
            raise APIError(502, f"{self.label} sent invalid JSON for {path}.",
                           code="upstream_error") from None

    async def get_status(self, path: str, timeout: float = HEALTH_TIMEOUT
                         ) -> tuple[int, bytes]:
        """A GET's status and body (``/health``), transport failures raised as APIError."""
        resp = await self.send("GET", path, timeout=timeout)
        try:
            content = await resp.aread()
        except httpx.HTTPError as exc:
            raise self.transport_error(exc) from None
        finally:
            await resp.aclose()
        return resp.status_code, content
