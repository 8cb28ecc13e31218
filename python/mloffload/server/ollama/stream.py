"""Ollama's newline-delimited JSON, made from a backend's OpenAI event stream as it arrives.

The backend's answer (our SSE, or llama-server's relayed) is run as the ASGI app it is, with
a ``send`` that turns its events into Ollama's lines. Running it, rather than reading its body
iterator, keeps what the response does around its body: watching for a client that leaves
(which stops the generation) and closing an upstream stream exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from ..errors import APIError, ClientGone
from . import errors
from .times import ns, rfc3339

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_DONE = b"[DONE]"
# An error inside a stream has no status: its code or, failing that, its type says which.
_STATUS_BY_CODE = {"request_timeout": 504, "upstream_timeout": 504, "model_not_found": 404,
                   "context_length_exceeded": 400, "rate_limit_exceeded": 429}
_STATUS_BY_TYPE = {"invalid_request_error": 400, "authentication_error": 401,
                   "not_found_error": 404, "rate_limit_error": 429, "upstream_error": 502,
                   "service_unavailable_error": 503, "timeout_error": 504}

OnBody = Callable[[bytes, bool], Awaitable[None]]  # (chunk, more to come)


class Fold:
    """One OpenAI stream read as one Ollama answer: its lines while it streams, then how it
    ended, its token counts and its durations (nanoseconds)."""

    def __init__(self, model: str, field: Literal["message", "response"], started: float,
                 *, stream: bool) -> None:
        self.model = model
        self.field = field
        self.started = started  # time.monotonic() when the request came in
        self.stream = stream
        self.load_seconds = 0.0  # set by the route when this request loaded the model
        self.parts: list[str] = []
        self.finish: str | None = None
        self.done = False
        self.error: dict[str, Any] | None = None
        self.prompt_tokens = self.completion_tokens = 0
        self.timings: dict[str, Any] = {}
        self.first: float | None = None
        self.last: float | None = None
        self._pending = b""
        self._head = b'{"model":' + orjson.dumps(model) + b',"created_at":"'
        if field == "message":
            self._mid = b'","message":{"role":"assistant","content":'
            self._tail = b'},"done":false}\n'
        else:
            self._mid = b'","response":'
            self._tail = b',"done":false}\n'

    def _events(self, data: bytes) -> list[Any]:
        data = self._pending + data if self._pending else data
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._pending = data
            return []
        self._pending = data[cut + 2:]
        out: list[Any] = []
        for line in data[:cut].split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == _DONE:
                out.append(_DONE)
                continue
            try:
                out.append(orjson.loads(payload))
            except orjson.JSONDecodeError:
                continue
        return out

    def _take(self, ev: dict[str, Any], texts: list[str]) -> None:
        if "error" in ev:
            err = ev["error"]
            self.error = err if isinstance(err, dict) else {"message": str(err)}
            return
        choices = ev.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            choice = choices[0]
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if isinstance(text, str) and text:
                texts.append(text)
            if choice.get("finish_reason"):
                self.finish = str(choice["finish_reason"])
        usage = ev.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)
        if isinstance(ev.get("timings"), dict):  # llama-server measures its own
            self.timings = ev["timings"]

    def feed(self, data: bytes) -> bytes:
        """Take the next bytes of the stream; return the Ollama lines they make (streaming)."""
        texts: list[str] = []
        for ev in self._events(data):
            if self.error is not None or self.done:
                continue
            if ev is _DONE:
                self.done = True
            elif isinstance(ev, dict):
                self._take(ev, texts)
        if not texts:
            return b""
        self.last = time.monotonic()
        if self.first is None:
            self.first = self.last
        text = "".join(texts)
        if not self.stream:
            self.parts.append(text)
            return b""
        return self._head + rfc3339().encode() + self._mid + orjson.dumps(text) + self._tail

    def problem(self) -> APIError | None:
        """Why the answer is not whole, if it is not."""
        if self.error is not None:
            code, kind = str(self.error.get("code")), str(self.error.get("type"))
            status = _STATUS_BY_CODE.get(code) or _STATUS_BY_TYPE.get(kind, 500)
            message = str(self.error.get("message") or "generation failed")
            return APIError(status, message, code=code)
        if not (self.done or self.finish):
            return APIError(502, "The answer ended before it was finished.",
                            code="incomplete_answer")
        return None

    def final(self) -> dict[str, Any]:
        """The answer's last object: how it ended, its counts and durations."""
        now = time.monotonic()
        first = self.first or now
        t = self.timings
        prompt_s = t["prompt_ms"] / 1000 if isinstance(t.get("prompt_ms"), int | float) \
            else first - self.started - self.load_seconds
        eval_s = t["predicted_ms"] / 1000 if isinstance(t.get("predicted_ms"), int | float) \
            else (self.last or first) - first
        prompt_n, completion_n = self.prompt_tokens, self.completion_tokens
        if not (prompt_n or completion_n) and t:
            prompt_n = int(t.get("prompt_n") or 0) + int(t.get("cache_n") or 0)
            completion_n = int(t.get("predicted_n") or 0)
        content = "".join(self.parts)
        out: dict[str, Any] = {
            "model": self.model, "created_at": rfc3339(),
            self.field: {"role": "assistant", "content": content} if self.field == "message"
            else content,
            "done": True,
            "done_reason": "length" if self.finish == "length" else "stop",
            "total_duration": ns(now - self.started),
            "load_duration": ns(self.load_seconds),
            "prompt_eval_count": prompt_n,
            "prompt_eval_duration": ns(prompt_s),
            "eval_count": completion_n,
            # Clients divide eval_count by it for tokens per second.
            "eval_duration": max(ns(eval_s), 1 if completion_n else 0),
        }
        return out

    def closing(self) -> bytes:
        """The stream's last line: the final object, or Ollama's error line."""
        problem = self.problem()
        if problem is not None:
            return errors.body(problem.message) + b"\n"
        return orjson.dumps(self.final()) + b"\n"


def answer_error(status: int, content: bytes) -> APIError:
    """A backend's non-200 answer (OpenAI's error shape, or anything) as an APIError."""
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        data = None
    err = data.get("error") if isinstance(data, dict) else None
    message = err.get("message") if isinstance(err, dict) else err
    if not isinstance(message, str) or not message:
        message = content.decode("utf-8", "replace")[:300] or f"HTTP {status}"
    return APIError(status if 400 <= status <= 599 else 502, message)


async def play(answer: Response, scope: Scope, receive: Receive, on_body: OnBody
               ) -> tuple[int, bytes]:
    """Run ``answer``; a 200 body goes to ``on_body`` as it comes. Returns the status and,
    for any other status, the whole body."""
    status = 200
    failed: list[bytes] = []

    async def sink(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
        elif message["type"] == "http.response.body":
            chunk, more = message.get("body", b""), message.get("more_body", False)
            if status == 200:
                await on_body(chunk, more)
            else:
                failed.append(chunk)

    await answer(scope, receive, sink)
    return status, b"".join(failed)


async def fold_answer(answer: Response, request: Request, fold: Fold) -> dict[str, Any]:
    """A non-streamed Ollama answer: the whole stream folded into its final object."""
    async def take(chunk: bytes, more: bool) -> None:
        fold.feed(chunk)

    status, failed = await play(answer, request.scope, request.receive, take)
    if status != 200:
        raise answer_error(status, failed)
    problem = fold.problem()
    if problem is not None:
        if await request.is_disconnected():
            raise ClientGone()
        raise problem
    return fold.final()


class NDJSONResponse(Response):
    """The backend's streamed answer, sent on as Ollama's lines while it runs."""

    media_type = "application/x-ndjson"

    def __init__(self, answer: Response, fold: Fold) -> None:
        self.answer = answer
        self.fold = fold
        self.status_code = 200
        self.background = None
        self.init_headers(HEADERS)  # no body: no Content-Length, the lines stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = finished = False
        early: APIError | None = None  # failed before a word: a real status, not a 200

        async def relay(chunk: bytes, more: bool) -> None:
            nonlocal started, finished, early
            if early is not None:
                return
            lines = self.fold.feed(chunk)
            if not started:
                # Held back until there is something to say (a queued request's ": queued"
                # comments are nothing to Ollama's clients), so that an error that comes
                # first (a full queue, an unknown model) still gets its own status.
                if self.fold.error is not None or not more:
                    early = self.fold.problem()
                    if early is not None:
                        return
                if not lines and more:
                    return
                await send({"type": "http.response.start", "status": 200,
                            "headers": self.raw_headers})
                started = True
            if not more:
                lines += self.fold.closing()
                finished = True
            if lines or not more:
                await send({"type": "http.response.body", "body": lines, "more_body": more})

        status, failed = await play(self.answer, scope, receive, relay)
        if status != 200:
            early = answer_error(status, failed)
        elif not finished and early is None:  # cut short (a client that left hears nothing)
            await relay(b"", False)
        if early is not None and not started:
            await errors.ollama_error(early)(scope, receive, send)


async def json_body(answer: Response, request: Request) -> Any:
    """A non-streamed JSON answer's body (embeddings), however the backend sent it."""
    parts: list[bytes] = []

    async def take(chunk: bytes, more: bool) -> None:
        parts.append(chunk)

    status, failed = await play(answer, request.scope, request.receive, take)
    if status != 200:
        raise answer_error(status, failed)
    try:
        return orjson.loads(b"".join(parts))
    except orjson.JSONDecodeError:
        raise APIError(502, "The backend's answer was not JSON.", code="bad_answer") from None
