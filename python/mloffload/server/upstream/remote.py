"""One remote upstream (llama-server, vLLM, another ml-offload): what it serves, how busy and
how healthy it is, and the low-rate probe that keeps that current.

Health is decided by the probe, a ``GET /v1/models`` (with our key, so a refused key shows)
every ``upstream_health_interval``: an answer is *up* (and refreshes the model list and,
from llama-server's ``/props``, its slots); no connection is *down*; 401/403 is *refused*;
any other status (503 while it loads) is *not ready*. A request whose connection to it
fails marks it down at once; a stream that breaks asks for a probe at once. Only an *up*
upstream (or one not checked yet) gets requests; the probe brings it back when it answers
again, without a restart of ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from typing import Any

from starlette.requests import Request

from ...config import Settings, UpstreamConfig
from ...models.registry import model_card
from ..errors import APIError
from ..stats import Stats
from .admission import AdmissionTurn, InFlightLimit
from .catalog import UpstreamModel, fetch_catalog
from .client import UpstreamClient
from .relay import Forwarder

log = logging.getLogger("mloffload.server")

MIN_RECHECK = 1.0  # seconds between probes asked for by failing requests


class State(enum.Enum):
    UNKNOWN = "unknown"  # not probed yet: requests may try it
    UP = "up"
    DOWN = "down"  # no connection, or an answer it cannot serve with
    REFUSED = "refused"  # it answers, but refuses our key
    NOT_READY = "not ready"  # it answers with an error (503 while it loads its model)


class Remote:
    """One ``[[upstreams]]`` entry: its client and forwarder, limit, catalog and health."""

    def __init__(self, config: UpstreamConfig, settings: Settings, stats: Stats) -> None:
        self.config = config
        self.url = config.url
        self.label = f"upstream {config.url}"
        key_hint = config.key_source or \
            "api_key_file in its [[upstreams]] entry (or a key in its URL)"
        self.client = UpstreamClient(config.url, config.api_key, label=self.label,
                                     request_timeout=settings.request_timeout,
                                     pool_timeout=settings.load_timeout, key_hint=key_hint,
                                     says=self.label)
        self.client.on_broken = self.check_soon
        self.forwarder = Forwarder(self.client, stats, settings)
        self.admission = InFlightLimit(self.label, settings.max_queue, config.max_in_flight)
        self.interval = settings.upstream_health_interval
        self.catalog: list[UpstreamModel] | None = None  # the last one it sent (kept while down)
        self.state = State.UNKNOWN
        self.reason = "not checked yet"
        self.checked_at: float | None = None
        self.requests = 0  # requests sent to it
        self._has_props = True  # it answers /props (llama-server: its slots)
        self._last_check = 0.0
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, probe once (so the first requests know where models are), then keep
        probing in the background."""
        self.client.start()
        await self.check()
        self._task = asyncio.get_running_loop().create_task(self._probe_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.close()

    async def _probe_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            await asyncio.sleep(max(0.0, self._last_check + MIN_RECHECK - time.monotonic()))
            try:
                await self.check()
            except Exception as exc:  # the probe must go on whatever one answer was
                log.error("probing %s failed: %r", self.label, exc)

    async def refresh(self) -> None:
        """Probe now unless a probe ran within the last second (a name no one listed)."""
        if time.monotonic() - self._last_check >= MIN_RECHECK:
            await self.check()

    def check_soon(self) -> None:
        """A connection to it broke: probe now rather than at the next tick."""
        self._wake.set()

    # --- health ---------------------------------------------------------------------------

    async def check(self) -> None:
        """Probe it now (concurrent callers share one probe)."""
        if self._lock.locked():
            async with self._lock:
                return
        async with self._lock:
            self._last_check = time.monotonic()
            ask_props = self._has_props or self.state is not State.UP
            try:
                catalog, slots = await fetch_catalog(self.client, None, props=ask_props)
            except APIError as exc:
                self._failed(exc)
                return
            except Exception as exc:  # an answer of a shape we cannot read
                self._set(State.DOWN, f"{self.label} sent a /v1/models we cannot read "
                          f"({type(exc).__name__}: {exc})")
                return
            finally:
                self.checked_at = time.time()
            if ask_props:  # vLLM and others have no /props: stop asking while it is up
                self._has_props = slots is not None
            if slots and self.config.max_in_flight is None and \
                    self.admission.limit != slots:
                self.admission.limit = slots
            self.catalog = catalog
            self._set(State.UP, "")

    def _failed(self, exc: APIError) -> None:
        if exc.code == "upstream_auth_failed":
            self._set(State.REFUSED, exc.message)
        elif exc.code == "model_loading":
            self._set(State.NOT_READY, exc.message)
        else:  # no connection, or an answer it cannot serve with: the reason says which
            self._set(State.DOWN, exc.message)

    def mark_down(self, error: APIError) -> None:
        """A request could not connect: out of rotation until the probe says otherwise."""
        self._set(State.DOWN, error.message)
        self.check_soon()

    def _set(self, state: State, reason: str) -> None:
        if state is not self.state:
            if state is State.UP:
                names = sorted(self.names())
                log.info("%s is up, serving %s", self.label, ", ".join(names) or "no models")
            elif state is not State.REFUSED:  # a refused key the client has logged
                log.warning("%s is %s: %s", self.label, state.value, reason)
        self.state, self.reason = state, reason

    @property
    def usable(self) -> bool:
        return self.state in (State.UP, State.UNKNOWN)

    def unavailable(self) -> APIError:
        """Why its models cannot be answered now, naming it."""
        if self.state is State.REFUSED:
            return APIError(502, self.reason, code="upstream_auth_failed")
        code = "model_loading" if self.state is State.NOT_READY else "backend_unavailable"
        return APIError(503, f"{self.reason.rstrip('.')}; its models are unavailable until it "
                        "answers again.", code=code,
                        headers={"Retry-After": str(max(1, round(self.interval)))})

    def detail(self) -> dict[str, Any]:
        """Its entry under `backends` in /api/health, and in /status."""
        ready = self.state is State.UP
        reachable = self.state in (State.UP, State.REFUSED, State.NOT_READY)
        if ready:
            details = f"{self.label} is up, serving {', '.join(sorted(self.names())) or 'none'}"
        else:
            details = self.reason
        a = self.admission
        return {"url": self.url, "state": self.state.value, "available": reachable,
                "ready": ready, "details": details, "checked_at": self.checked_at,
                "models": sorted(self.names()), "in_flight": a.in_flight - a.waiting,
                "waiting": a.waiting, "max_in_flight": a.limit, "requests": self.requests}

    # --- models ---------------------------------------------------------------------------

    def names(self) -> dict[str, str]:
        """Every name routed here → the upstream's own id for it. Configured ``models``
        (and their aliases) when given, else what its /v1/models lists (llama-server's
        ``--alias a,b`` included)."""
        out: dict[str, str] = {}
        if self.config.models:
            for m in self.config.models:
                out[m.id] = m.id
                out.update(dict.fromkeys(m.aliases, m.id))
            return out
        for um in self.catalog or []:
            out.update(dict.fromkeys(um.names, um.upstream_id))
            for alias in um.upstream_aliases:
                out.setdefault(alias, um.upstream_id)
        return out

    @property
    def models_known(self) -> bool:
        return bool(self.config.models) or self.catalog is not None

    def model(self, upstream_id: str) -> UpstreamModel | None:
        return next((m for m in self.catalog or [] if m.upstream_id == upstream_id), None)

    def served(self) -> list[tuple[str, list[str]]]:
        """``(upstream id, the other names it answers to here)`` for each model listed."""
        names = self.names()
        ids = list(dict.fromkeys(names.values()))
        return [(uid, sorted(n for n, u in names.items() if u == uid and n != uid))
                for uid in ids]

    def place(self) -> dict[str, Any]:
        """Where a model runs, for its `/v1/models` entry (``meta.upstream``)."""
        return {"url": self.url, "state": self.state.value, "available": self.usable}

    def card(self, uid: str, aliases: list[str], replicas: list[Remote]) -> dict[str, Any]:
        """The `/v1/models` entry of one of its models (replicas: every upstream with it)."""
        um = self.model(uid)
        um_meta = um.upstream_meta if um is not None else {}
        best = next((r for r in replicas if r.usable), replicas[0])
        available = best.usable
        meta: dict[str, Any] = {
            "id": uid, "aliases": aliases, "path": None, "usable": True, "reason": None,
            "source": "upstream", "file_size": um_meta.get("size"), "architecture": None,
            "name": None, "size_label": None, "parameter_count": um_meta.get("n_params"),
            "quantization": um_meta.get("ftype"),
            "context_length": um_meta.get("n_ctx_train") or um_meta.get("max_model_len"),
            "embedding_length": um_meta.get("n_embd"), "block_count": None,
            "has_chat_template": None, "loaded": available, "available": available,
            "upstream_id": uid, "upstream": best.place(),
            "replicas": [r.place() for r in replicas],
        }
        created = um.created if um is not None else int(time.time())
        return model_card(uid, created, "upstream", meta)

    # --- requests -------------------------------------------------------------------------

    async def enter(self, request: Request) -> AdmissionTurn:
        turn = await self.admission.enter(request)
        self.requests += 1
        return turn
