"""Each model to where it runs: our own engines (the primary backend) or remote upstreams.

A request's ``model`` is looked up in the registry's names and aliases first (the primary
backend answers those), then in every upstream's names (its ``/v1/models`` ids, or the
``models`` and aliases its entry names); anything else goes to the primary, which answers
404 for a name nobody knows. Upstreams that serve the same name are replicas: a request
goes to the least busy one that is up (requests there, working or waiting, per slot of its
``max_in_flight``), round-robin among equals; when the connection to it fails before any
byte of the answer came back, the next one is tried. Health (up, down, refused key, not
ready) comes from each upstream's probe (``remote.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, NamedTuple

from starlette.requests import Request
from starlette.responses import Response

from ...config import Settings
from ...models.registry import Registry
from ..backend import Backend, ClientGone, Health
from ..errors import APIError
from ..fim import as_fim_error, fim_request_model, infill_body
from ..schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    InfillRequest,
    TokenizeRequest,
)
from ..stats import Outcome, Stats
from .backend import check_dimensions
from .relay import LLAMA_END, OPENAI_END, AnyRequest, NotSent, StreamEnd, post_plain, request_body
from .remote import Remote

log = logging.getLogger("mloffload.server")


class Replica(NamedTuple):
    remote: Remote
    upstream_id: str  # the model's id at that upstream


class Balancer:
    """Which replica takes a request: the least busy one that is up, round-robin among equals."""

    def __init__(self) -> None:
        self._turns: dict[str, int] = {}  # round-robin position per model name

    def pick(self, name: str, replicas: list[Replica], tried: list[Remote]) -> Replica | None:
        ready = [r for r in replicas if r.remote.usable and r.remote not in tried]
        if not ready:
            return None
        least = min(r.remote.admission.load for r in ready)
        equals = [r for r in ready if r.remote.admission.load == least]
        turn = self._turns.get(name, 0)
        self._turns[name] = turn + 1
        return equals[turn % len(equals)]


def unavailable(name: str, replicas: list[Replica]) -> APIError:
    """The answer when no replica of ``name`` is up, naming each and why."""
    errors = [r.remote.unavailable() for r in replicas]
    if len(errors) == 1:
        return errors[0]
    refused = all(e.status == 502 for e in errors)
    return APIError(502 if refused else 503,
                    f"No replica of model {name!r} can answer now: "
                    f"{' '.join(e.message for e in errors)}",
                    code="upstream_auth_failed" if refused else "backend_unavailable",
                    headers=errors[0].headers)


class Router:
    """A Backend: the primary backend and the remote upstreams, chosen by model name."""

    def __init__(self, primary: Backend, remotes: list[Remote], registry: Registry,
                 settings: Settings, stats: Stats) -> None:
        self.primary = primary
        self.name = primary.name
        self.remotes = remotes
        self.registry = registry
        self.settings = settings
        self.stats = stats
        self.balancer = Balancer()
        self._shadowed: set[tuple[str, str]] = set()  # (url, name) already warned about

    async def startup(self) -> None:
        logging.getLogger("httpx").setLevel(logging.WARNING)
        await self.primary.startup()
        await asyncio.gather(*(r.start() for r in self.remotes))

    async def shutdown(self) -> None:
        await asyncio.gather(*(r.stop() for r in self.remotes), return_exceptions=True)
        await self.primary.shutdown()

    # --- routing --------------------------------------------------------------------------

    def _replicas(self, name: str) -> list[Replica]:
        return [Replica(r, uid) for r in self.remotes if (uid := r.names().get(name))]

    async def _refresh(self) -> None:
        """Ask the upstreams that are up what they serve now (at most once a second each)."""
        await asyncio.gather(*(r.refresh() for r in self.remotes if r.usable))

    async def route(self, name: str) -> list[Replica] | None:
        """The upstreams that serve ``name``, or None when the primary answers it."""
        if self.registry.resolve(name) is not None:
            return None
        if replicas := self._replicas(name):
            return replicas
        await self._refresh()  # a name no one listed: it may have been added since
        if replicas := self._replicas(name):
            return replicas
        unknown = [r for r in self.remotes if not r.models_known]
        if unknown:  # say who could not be asked, rather than "not found"
            errors = [r.unavailable() for r in unknown]
            first = next((e for e in errors if e.status == 502), errors[0])
            raise APIError(first.status, f"No model {name!r} is known here, and what "
                           f"{' and '.join(r.label for r in unknown)} "
                           f"serve{'s' if len(unknown) == 1 else ''} is unknown: "
                           f"{' '.join(e.message for e in errors)}", code=first.code,
                           param="model", headers=first.headers)
        return None

    async def _routed(self, name: str) -> list[Replica] | None:
        try:
            return await self.route(name)
        except APIError as exc:
            self._count(exc)
            raise

    def _count(self, exc: APIError) -> None:
        self.stats.record(Outcome.REJECTED if exc.status in (429, 503) else Outcome.FAILED)

    async def _forward(self, path: str, req: AnyRequest | InfillRequest, request: Request,
                       replicas: list[Replica], name: str | None = None,
                       end: StreamEnd = OPENAI_END) -> Response:
        """Send ``req`` to the least busy replica of ``name`` (its model by default), and to
        the next when the connection fails before the answer begins."""
        name = name or req.model or ""
        if log.isEnabledFor(logging.DEBUG):  # prompt text is logged at debug level only
            log.debug("%s model=%s body=%r", path, name, req.model_dump(exclude_unset=True))
        stream = not isinstance(req, EmbeddingRequest) and req.stream
        tried: list[Remote] = []
        last: APIError | None = None
        while True:
            try:
                replica = self.balancer.pick(name, replicas, tried)
                if replica is None:
                    raise last or unavailable(name, replicas)
                remote = replica.remote
                if isinstance(req, EmbeddingRequest):
                    um = remote.model(replica.upstream_id)
                    check_dimensions(req, um.n_embd if um is not None else None)
                body = infill_body(req, replica.upstream_id, self.settings) \
                    if isinstance(req, InfillRequest) \
                    else request_body(req, replica.upstream_id, self.settings)
                turn = await remote.enter(request)
            except APIError as exc:
                self._count(exc)
                raise
            except ClientGone:
                self.stats.record(Outcome.CANCELLED)
                raise
            tried.append(remote)
            try:
                return await remote.forwarder.forward(path, body, req.model or name, stream,
                                                      request, turn, path, end=end,
                                                      retry=True)
            except NotSent as exc:  # the next replica, if any, takes it; else this error
                last = exc.error
                if exc.error.code == "backend_unavailable":
                    remote.mark_down(exc.error)
                if any(r.remote.usable and r.remote not in tried for r in replicas):
                    log.warning("%s failed before answering (%s); trying another replica "
                                "of %s", remote.label, exc.error.message.rstrip("."),
                                req.model)

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        replicas = await self._routed(req.model)
        if replicas is None:
            return await self.primary.chat(req, request)
        return await self._forward("/v1/chat/completions", req, request, replicas)

    async def completion(self, req: CompletionRequest, request: Request) -> Response:
        replicas = await self._routed(req.model)
        if replicas is None:
            return await self.primary.completion(req, request)
        return await self._forward("/v1/completions", req, request, replicas)

    async def embeddings(self, req: EmbeddingRequest, request: Request) -> Response:
        replicas = await self._routed(req.model)
        if replicas is None:
            return await self.primary.embeddings(req, request)
        return await self._forward("/v1/embeddings", req, request, replicas)

    async def infill(self, req: InfillRequest, request: Request) -> Response:
        """llama-server's /infill, relayed as it is to an upstream (a llama-server or
        another ml-offload; one that has no /infill answers its own 404)."""
        name = fim_request_model(req.model, self.settings)
        replicas = await self._routed(name)
        if replicas is None:
            return await self.primary.infill(req, request)
        try:
            return await self._forward("/infill", req, request, replicas, name, LLAMA_END)
        except APIError as exc:
            raise as_fim_error(exc, name) from None

    async def tokenize(self, req: TokenizeRequest, request: Request) -> Response:
        return await self._plain("/tokenize", req.model, req.model_dump(), request) \
            or await self.primary.tokenize(req, request)

    async def detokenize(self, req: DetokenizeRequest, request: Request) -> Response:
        return await self._plain("/detokenize", req.model, req.model_dump(), request) \
            or await self.primary.detokenize(req, request)

    async def _plain(self, path: str, name: str, data: dict[str, Any], request: Request
                     ) -> Response | None:
        """A quick request to the first usable replica of ``name``; None when the primary
        serves it."""
        replicas = await self._routed(name)
        if replicas is None:
            return None
        replica = self.balancer.pick(name, replicas, [])
        if replica is None:
            raise unavailable(name, replicas)
        return await post_plain(replica.remote.client, path,
                                {**data, "model": replica.upstream_id}, request)

    # --- models ---------------------------------------------------------------------------

    async def models(self) -> dict[str, Any]:
        listing, _ = await asyncio.gather(self.primary.models(), self._refresh())
        local = {n for card in listing["data"]
                 for n in (card["id"], *(card.get("meta") or {}).get("aliases", []))}
        by_id: dict[str, list[tuple[Remote, list[str]]]] = {}
        for remote in self.remotes:
            for uid, aliases in remote.served():
                if uid in local:
                    self._warn_shadowed(remote, uid)
                    continue
                by_id.setdefault(uid, []).append((remote, aliases))
        cards = []
        for uid, serving in by_id.items():
            aliases = sorted({a for _, names in serving for a in names} - local)
            replicas = [r for r, _ in serving]
            cards.append(replicas[0].card(uid, aliases, replicas))
        return {"object": "list", "data": [*listing["data"], *cards]}

    def _warn_shadowed(self, remote: Remote, name: str) -> None:
        if (remote.url, name) not in self._shadowed:
            self._shadowed.add((remote.url, name))
            log.warning("model %r of %s is not listed: a local model has that name, and "
                        "local names come first", name, remote.label)

    def _runs_remotely(self, name: str) -> None:
        if self.registry.resolve(name) is None and (replicas := self._replicas(name)):
            raise APIError(400, f"Model {name!r} runs on "
                           f"{', '.join(r.remote.label for r in replicas)}, which loads its "
                           "own models.", code="unsupported_backend", param="model")

    async def load(self, name: str, keep_alive: float | None = None) -> dict[str, Any]:
        self._runs_remotely(name)
        return await self.primary.load(name, keep_alive)

    async def unload(self, name: str) -> dict[str, Any]:
        self._runs_remotely(name)
        return await self.primary.unload(name)

    # --- facts ----------------------------------------------------------------------------

    async def health(self) -> Health:
        """The primary's readiness (an upstream that is down costs only its models), with
        every upstream's own entry next to it."""
        health = await self.primary.health()
        return dataclasses.replace(health, upstreams={r.url: r.detail() for r in self.remotes})

    async def info(self) -> dict[str, Any]:
        return {**await self.primary.info(), "upstreams": [r.detail() for r in self.remotes]}

    def status(self) -> dict[str, Any]:
        return {**self.primary.status(), "upstreams": [r.detail() for r in self.remotes]}

    def engine_pids(self) -> dict[int, dict[str, Any]]:
        return self.primary.engine_pids()
