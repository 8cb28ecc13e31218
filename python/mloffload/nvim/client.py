"""HTTP client for the Neovim plugin: the server's API over httpx, chat streamed as SSE.
(Long because it is the plugin's whole view of the server's API: one method an endpoint.)

Only ``httpx`` and the standard library are needed, so the plugin works in a Python host
that has nothing else installed. The chat stream has the engine's shape (text pieces,
usage written into a ``GenerationResult``, a ``threading.Event`` to cancel), so the plugin
drives the server and the in-process fallback with the same code.

A failure to *connect* (refused, DNS, connect timeout) is ``ServerUnreachable``: the plugin
then falls back to in-process inference. Anything the live server answers with an error is
``ServerError`` carrying the server's own message (``AuthError`` for a refused key); it never
triggers the fallback.

While a streamed request waits in the server's queue, the server sends SSE comments
``: queued N`` (N requests ahead) every second: ``chat`` reports them to ``on_queue``. They
keep the connection busy, so the read timeout only ever fires on silence from a server
that is answering.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from typing import Any

import httpx

from ..engine.base import FINISH_CANCELLED, GenerationResult

DEFAULT_API_URL = "http://127.0.0.1:9000"
START_HINT = "start it with: python -m mloffload.server"


class ClientError(Exception):
    """A request failed; ``str()`` is a message meant for the user."""


class ServerUnreachable(ClientError):
    """Nothing answered at the API URL (connection refused, DNS failure, connect timeout)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the ml-offload server at {url} ({reason}); {START_HINT}")
        self.url = url
        self.reason = reason


class ServerError(ClientError):
    """The server answered with an error; the message is the server's own, and what to do.

    ``status`` is None for an error sent as an event inside a stream that had begun."""

    def __init__(self, status: int | None, message: str, type_: str = "",
                 code: str | None = None, hint: str = "") -> None:
        where = f"server error {status}" if status is not None else "server error"
        super().__init__(f"{where}: {message}" + (f" — {hint}" if hint else ""))
        self.status = status
        self.server_message = message
        self.type = type_
        self.code = code


class AuthError(ServerError):
    """The server refused our API key (or we sent none)."""


AUTH_HINT = "set api_key in require('ml-offload').setup() or $ML_OFFLOAD_API_KEY"
HINTS = {
    "model_not_found": ":MLModels lists the models",
    "context_length_exceeded": "start a new chat (:MLChatNew), or attach less context",
    "rate_limit_exceeded": "the server's queue is full: try again in a moment",
}
QUEUED = re.compile(r"^:\s*queued\s+(\d+)")


class ServerTimeout(ClientError):
    """The server accepted the connection but did not answer in time."""


class StreamBroken(ClientError):
    """The connection dropped in the middle of an answer."""


def _reason(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return "connect timed out"
    text = str(exc) or type(exc).__name__
    low = text.lower()
    if "refused" in low:
        return "connection refused"
    if "name or service not known" in low or "nodename nor servname" in low or (
        "name resolution" in low
    ):
        return "host name not found"
    return text


def server_error(status: int | None, message: str, type_: str = "", code: str | None = None,
                 where: str = "") -> ServerError:
    """The error, with what to do about it: a refused key, an unknown model, a URL that is
    not an ml-offload server."""
    if status in (401, 403) or code in ("invalid_api_key", "unauthorized"):
        return AuthError(status, message, type_, code,
                         f"the server{f' at {where}' if where else ''} refused the API key: "
                         f"{AUTH_HINT}")
    hint = HINTS.get(code or "", "")
    if not hint and status == 404:
        hint = (f"is api_url ({where or 'the URL'}) an ml-offload server? It listens on 9000 "
                "by default; llama-server itself on 8080")
    return ServerError(status, message, type_, code, hint)


def error_from_body(status: int, body: bytes, where: str = "") -> ServerError:
    """The OpenAI error shape ``{"error": {"message", "type", "code"}}``, or the raw text."""
    try:
        err = json.loads(body)["error"]
        return server_error(status, str(err["message"]), str(err.get("type") or ""),
                            err.get("code"), where)
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace").strip()[:300] or httpx.codes.get_reason_phrase(
            status)
        return server_error(status, text, where=where)


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """The model that really answers a name, and the context it runs with."""

    id: str
    n_ctx: int | None = None


class _ConnectionCutter:
    """Cuts one request's TCP connection from another thread, whatever it is waiting for.

    The reading thread may be blocked for a long time with nothing to look at: while the
    request waits in the server's queue (no headers yet), or while a long prompt is
    processed. ``shutdown()`` on the socket wakes that read at once and tells the server
    the client is gone, so it drops or stops the request. The socket comes from httpcore's
    documented ``trace`` extension, when the connection is made.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._cut = False

    def trace(self, name: str, info: dict[str, Any]) -> None:
        if name != "connection.connect_tcp.complete":
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        with self._lock:
            self._sock = sock
            if self._cut:
                self._shutdown()

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def _cut_on(cancel: threading.Event) -> Iterator[_ConnectionCutter]:
    """A cutter that a watcher thread fires as soon as ``cancel`` is set."""
    cutter = _ConnectionCutter()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if cancel.wait(0.05):
                cutter.cut()
                return

    threading.Thread(target=watch, name="ml-offload-cancel", daemon=True).start()
    try:
        yield cutter
    finally:
        done.set()


class Client:
    """One API URL. Thread-safe (httpx's client is); each call is one request."""

    FACTS_TTL = 5.0  # seconds a model's facts are reused

    def __init__(self, base_url: str = DEFAULT_API_URL, *, timeout: float = 30.0,
                 connect_timeout: float = 1.0, api_key: str = "",
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._options: dict[str, Any] = {
            "base_url": self.base_url,
            "timeout": httpx.Timeout(timeout, connect=connect_timeout),
            "headers": headers,
            # The server is local (or on the LAN): a proxy from the environment must not
            # capture its requests.
            "trust_env": False,
        }
        if transport is not None:
            self._options["transport"] = transport
        self._facts: dict[str, tuple[float, ModelFacts]] = {}
        self._facts_lock = threading.Lock()
        try:
            self._http = httpx.Client(**self._options)
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            raise ClientError(f"api_url {base_url!r} is not a valid URL: {exc}") from None

    def close(self) -> None:
        self._http.close()

    def _translate(self, exc: httpx.HTTPError) -> ClientError:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return ServerUnreachable(self.base_url, _reason(exc))
        if isinstance(exc, httpx.TimeoutException):
            return ServerTimeout(f"the server at {self.base_url} went silent for "
                                 f"{self.timeout:g} s ({type(exc).__name__}); raise `timeout` "
                                 "in setup() if it is just slow")
        if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
            return ClientError(f"api_url {self.base_url!r} is not a valid http(s) URL")
        return StreamBroken(f"the connection to {self.base_url} broke: {_reason(exc)}")

    def request_json(self, method: str, path: str, body: Mapping[str, Any] | None = None,
                     timeout: float | None = None) -> Any:
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs["json"] = body
        if timeout is not None:
            kwargs["timeout"] = httpx.Timeout(timeout, connect=min(timeout, 1.0))
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._translate(exc) from None
        if resp.status_code >= 400:
            raise error_from_body(resp.status_code, resp.content, self.base_url + path)
        try:
            return resp.json()
        except ValueError:
            raise ClientError(f"{path} answered with something that is not JSON") from None

    # --- endpoints ------------------------------------------------------------------

    def probe(self, timeout: float = 3.0) -> dict[str, Any]:
        """The cheap check made before each request: ``/api/health`` with a short timeout."""
        data = self.request_json("GET", "/api/health", timeout=timeout)
        return data if isinstance(data, dict) else {}

    def get(self, path: str) -> Any:
        return self.request_json("GET", path)

    def models(self) -> list[dict[str, Any]]:
        data = self.request_json("GET", "/v1/models")
        return list(data.get("data") or [])

    def backend_info(self) -> dict[str, Any]:
        data = self.request_json("GET", "/api/backend/info")
        return data if isinstance(data, dict) else {}

    def model_facts(self, name: str) -> ModelFacts:
        """The registry id behind ``name`` (an alias such as "default" included) and the
        context the server runs it with: ``/v1/models`` and ``/api/backend/info``, reused
        for a few seconds."""
        now = time.monotonic()
        with self._facts_lock:
            hit = self._facts.get(name)
            if hit is not None and now - hit[0] < self.FACTS_TTL:
                return hit[1]
        facts = served_facts(name, self.models(), self._info_or_empty())
        with self._facts_lock:
            self._facts[name] = (now, facts)
        return facts

    def _info_or_empty(self) -> dict[str, Any]:
        try:
            return self.backend_info()
        except AuthError:
            raise
        except ClientError:  # older servers, other backends: the facts are optional
            return {}

    def embed(self, text: str, model: str) -> list[float]:
        data = self.request_json("POST", "/v1/embeddings", {"model": model, "input": text})
        try:
            return [float(x) for x in data["data"][0]["embedding"]]
        except (KeyError, IndexError, TypeError, ValueError):
            raise ClientError("/v1/embeddings answered without an embedding") from None

    def chat(self, messages: Sequence[Mapping[str, Any]], model: str,
             params: Mapping[str, Any], result: GenerationResult,
             cancel: threading.Event,
             on_queue: Callable[[int], None] | None = None) -> Generator[str, None, None]:
        """Stream a chat answer; stops (closing the HTTP stream) as soon as ``cancel`` is set.

        Nothing is sent until the first ``next()``; a connect failure raises
        ``ServerUnreachable`` there, before any text. ``on_queue(n)`` hears each
        ``: queued n`` the server sends while the request waits for a model slot.
        """
        payload = {**params, "model": model, "messages": list(messages), "stream": True,
                   "stream_options": {"include_usage": True}}
        with contextlib.closing(self._lines("/v1/chat/completions", payload, cancel)) as lines:
            for line in lines:
                queued = QUEUED.match(line)
                if queued:
                    if on_queue is not None:
                        on_queue(int(queued.group(1)))
                    continue
                text = self._sse_line(line, result)
                if text is None:
                    return
                if text:
                    yield text
        if cancel.is_set():
            result.finish_reason = FINISH_CANCELLED
        elif result.finish_reason is None:
            raise StreamBroken(f"the answer from {self.base_url} ended without [DONE]")

    def infill(self, body: Mapping[str, Any], result: GenerationResult,
               cancel: threading.Event) -> Generator[str, None, dict[str, Any]]:
        """Stream ``/infill`` (llama-server's events: ``content`` pieces, then one with
        ``"stop": true``); stops, closing the connection, as soon as ``cancel`` is set.
        Returns the final event (timings, model)."""
        with contextlib.closing(self._lines("/infill", {**body, "stream": True}, cancel)) \
                as lines:
            for line in lines:
                event = self._event(line)
                if event.get("content"):
                    yield str(event["content"])
                if event.get("stop") is True:
                    result.finish_reason = str(event.get("stop_type") or "stop")
                    return event
        if not cancel.is_set():
            raise StreamBroken(f"the completion from {self.base_url} ended before its end")
        result.finish_reason = FINISH_CANCELLED
        return {}

    def _lines(self, path: str, payload: Mapping[str, Any], cancel: threading.Event
               ) -> Generator[str, None, None]:
        """The lines of a streamed answer, on a connection of its own so that a cancel can
        cut exactly this request (the server then stops generating). Ends quietly once
        ``cancel`` is set; an error answer raises before any line."""
        try:
            with _cut_on(cancel) as cutter, httpx.Client(**self._options) as http, \
                    http.stream("POST", path, json=dict(payload),
                                extensions={"trace": cutter.trace}) as resp:
                if resp.status_code >= 400:
                    raise error_from_body(resp.status_code, resp.read(), self.base_url + path)
                for line in resp.iter_lines():
                    if cancel.is_set():
                        return  # leaving the block closes the connection
                    yield line
        except httpx.HTTPError as exc:
            if not cancel.is_set():  # else: the cutter cut the connection on purpose
                raise self._translate(exc) from None

    @staticmethod
    def _event(line: str) -> dict[str, Any]:
        """One ``data:`` line of llama-server's own stream ({} for anything else); its
        error event raised as ours."""
        if not line.startswith("data:"):
            return {}
        try:
            event = json.loads(line[5:].strip())
        except ValueError:
            return {}
        if not isinstance(event, dict):
            return {}
        if "error" in event:
            err = event["error"] if isinstance(event["error"], dict) else {}
            raise server_error(None, str(err.get("message") or event["error"]),
                               str(err.get("type") or ""), err.get("code"))
        return event

    @staticmethod
    def _sse_line(line: str, result: GenerationResult) -> str | None:
        """Text carried by one SSE line ('' for none); None at ``[DONE]``."""
        if not line.startswith("data:"):
            return ""
        payload = line[5:].strip()
        if payload == "[DONE]":
            if result.finish_reason is None:
                result.finish_reason = "stop"
            return None
        try:
            chunk = json.loads(payload)
        except ValueError:
            return ""
        if "error" in chunk:
            err = chunk["error"] if isinstance(chunk["error"], dict) else {}
            raise server_error(None, str(err.get("message") or chunk["error"]),
                               str(err.get("type") or ""), err.get("code"))
        usage = chunk.get("usage")
        if usage:
            result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            result.completion_tokens = int(usage.get("completion_tokens") or 0)
        parts = []
        for choice in chunk.get("choices") or []:
            if choice.get("finish_reason"):
                result.finish_reason = str(choice["finish_reason"])
            content = (choice.get("delta") or {}).get("content")
            if content:
                parts.append(str(content))
        return "".join(parts)


def served_facts(name: str, cards: Sequence[Mapping[str, Any]],
                 info: Mapping[str, Any]) -> ModelFacts:
    """A name's model id (by id or alias) and its context: the loaded model's ``n_ctx``,
    else the server's ``n_ctx`` setting (or llama-server's), at most the trained length."""
    card = next((c for c in cards if c.get("id") == name
                 or name in ((c.get("meta") or {}).get("aliases") or [])), None)
    mid = str(card["id"]) if card else name
    trained = _int(((card or {}).get("meta") or {}).get("context_length"))
    n_ctx = None
    for loaded in info.get("loaded_models") or []:
        if isinstance(loaded, Mapping) and loaded.get("id") == mid:
            n_ctx = _int(loaded.get("n_ctx"))
    if n_ctx is None:
        n_ctx = _int((info.get("settings") or {}).get("n_ctx")) or _int(
            (info.get("upstream") or {}).get("n_ctx"))
    if n_ctx is None or (trained is not None and trained < n_ctx):
        n_ctx = trained if n_ctx is None else min(n_ctx, trained or n_ctx)
    return ModelFacts(mid, n_ctx)


def _int(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None
