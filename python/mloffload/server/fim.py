"""Fill in the middle on the server: which model answers, and llama-server's /infill answer.

``/infill`` answers as llama-server does (``server-task.cpp``, ``to_json_non_oaicompat``):
the same fields in the same order, written as compact JSON, with ``response_fields``
picking and flattening fields (``"timings/prompt_n"`` becomes a top-level key). The
in-process backend builds it here; managed mode relays the engine's own. A ``suffix`` on
``/v1/completions`` is FIM too: in-process it runs the same infill; through a llama-server
(which refuses ``suffix``) it is sent to that server's /infill and the answer translated.
"""

from __future__ import annotations

import struct
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from ..config import Settings
from ..engine.base import FINISH_LENGTH, SamplingParams
from ..engine.fim import InfillResult
from ..models.registry import DEFAULT_ALIAS, ModelEntry
from .errors import APIError
from .schemas import RANDOM_SEED, CompletionRequest, InfillRequest
from .sse import DONE, ChunkTemplate, event

FIM_UNSUPPORTED = "fim_unsupported"
_ADVICE = ("Use a model trained for it (Qwen2.5-Coder, for example), or name one with the "
           "fim_model setting.")


def fim_unsupported(model_id: str, detail: str = "") -> APIError:
    why = detail or "it has no FIM prefix, suffix and middle tokens"
    return APIError(400, f"The model {model_id!r} cannot fill in the middle: {why}. {_ADVICE}",
                    code=FIM_UNSUPPORTED, param="model")


def fim_request_model(requested: str | None, settings: Settings) -> str:
    """The name a FIM request resolves: the one it gave, else the fim_model setting, else
    the default model. ``"default"`` counts as none given (the server's choice)."""
    if requested and requested != DEFAULT_ALIAS:
        return requested
    return settings.fim_model or DEFAULT_ALIAS


def fim_entry(name: str, resolve: Callable[[str], ModelEntry]) -> ModelEntry:
    """The registry entry for ``name``; 400 ``fim_unsupported`` when its header shows no
    FIM tokens (checked before anything is loaded)."""
    entry = resolve(name)
    if entry.info is not None and not entry.info.can_fim:
        raise fim_unsupported(entry.id)
    return entry


def check_token_ids(entry: ModelEntry, **fields: Any) -> None:
    """400 ``invalid_value`` for a token id past the model's vocabulary (its header's size),
    in any of ``fields`` (a text, or a list of texts and ids): llama-server answers those
    with a 500, llama.cpp in-process would read out of bounds."""
    size = entry.info.vocab_size if entry.info is not None else 0
    if not size:
        return
    for param, value in fields.items():
        for item in value if isinstance(value, list) else ():
            if isinstance(item, int) and item >= size:
                raise APIError(400, f"Token id {item} is not in this model's vocabulary "
                               f"(0 to {size - 1}).", code="invalid_value", param=param)


def as_fim_error(exc: APIError, model_id: str) -> APIError:
    """llama-server's own refusal (501 "Infill is not supported by this model") as ours."""
    if exc.status == 501 and "not supported" in exc.message.lower():
        return fim_unsupported(model_id, exc.message.removeprefix("llama-server: ").rstrip(". "))
    return exc


def completion_as_infill(req: CompletionRequest, settings: Settings) -> InfillRequest:
    """A ``/v1/completions`` request with a ``suffix`` as the /infill request it means:
    the prompt is the prefix; the sampling fields carry over."""
    params = req.sampling(settings)
    data: dict[str, Any] = {
        "input_prefix": req.prompt_text, "input_suffix": req.suffix or "",
        "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
        "min_p": req.min_p, "repeat_penalty": req.repeat_penalty,
        "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
        "stream": req.stream, "n_predict": params.max_tokens or -1,
    }
    if req.stop is not None:
        data["stop"] = req.stop
    if params.seed is not None:
        data["seed"], data["cache_prompt"] = params.seed, False
    return InfillRequest.model_validate(data)


def shown_n_predict(req: InfillRequest, params: SamplingParams) -> int:
    """The n_predict llama-server reports: 0 stays 0 (one token is made all the same)."""
    if req.n_predict == 0:
        return 0
    return params.max_tokens if params.max_tokens is not None else -1


def infill_body(req: InfillRequest, upstream_id: str, settings: Settings) -> bytes:
    """The /infill request sent to a llama-server: what the client sent (extras included),
    with our n_predict default and cap and our seed rule, as for the other endpoints."""
    data = req.model_dump(exclude_unset=True, exclude={"keep_alive"}, by_alias=False)
    data.pop("max_tokens", None)
    data["model"] = upstream_id
    params = req.sampling(settings)
    data["n_predict"] = shown_n_predict(req, params)
    if params.seed is not None:
        data.setdefault("cache_prompt", False)
    return orjson.dumps(data)


# --- the /infill answer, built in-process ----------------------------------------------


def pick_fields(paths: Sequence[str], body: dict[str, Any]) -> dict[str, Any]:
    """``json_get_nested_values``: each path ("a/b") that exists, under its own name."""
    out: dict[str, Any] = {}
    for path in paths:
        value: Any = body
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            out[path] = value
    return out


def _f32(x: float) -> float:
    """A value as llama-server holds it (a C float) and prints it (as a double)."""
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def generation_settings(req: InfillRequest, params: SamplingParams, samplers: Sequence[str]
                        ) -> dict[str, Any]:
    """llama-server's ``generation_settings``, key for key; the values are the ones this
    generation ran with (those it has no such sampler for are llama-server's defaults,
    which leave the sampler off)."""
    n = shown_n_predict(req, params)
    return {
        "seed": RANDOM_SEED if params.seed is None else params.seed,
        "temperature": _f32(params.temperature), "dynatemp_range": 0.0,
        "dynatemp_exponent": 1.0, "top_k": params.top_k, "top_p": _f32(params.top_p),
        "min_p": _f32(params.min_p), "top_n_sigma": -1.0, "xtc_probability": 0.0,
        "xtc_threshold": _f32(0.1), "typical_p": 1.0, "repeat_last_n": 64,
        "repeat_penalty": _f32(params.repeat_penalty),
        "presence_penalty": _f32(params.presence_penalty),
        "frequency_penalty": _f32(params.frequency_penalty), "dry_multiplier": 0.0,
        "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": 64,
        "dry_sequence_breakers": ["\n", ":", "\"", "*"], "mirostat": 0, "mirostat_tau": 5.0,
        "mirostat_eta": _f32(0.1), "adaptive_target": -1.0, "adaptive_decay": _f32(0.9),
        "stop": list(params.stop), "max_tokens": n, "n_predict": n, "n_keep": 0,
        "n_discard": 0, "ignore_eos": False, "stream": req.stream, "logit_bias": [],
        "n_probs": 0, "min_keep": 0, "grammar": "", "grammar_lazy": False,
        "grammar_triggers": [], "preserved_tokens": [], "chat_format": "Content-only",
        "reasoning_format": "deepseek", "reasoning_in_content": False,
        "generation_prompt": "", "samplers": list(samplers), "speculative.types": "none",
        "timings_per_token": False, "post_sampling_probs": False, "backend_sampling": False,
        "lora": [],
    }


def predicted(r: InfillResult) -> int:
    """Tokens generated as llama-server counts them: the end-of-generation one too."""
    return r.completion_tokens + (1 if r.eog else 0)


def stop_type(r: InfillResult) -> str:
    if r.eog:
        return "eos"
    if r.stop_word:
        return "word"
    return "limit" if r.finish_reason == FINISH_LENGTH else "none"


def timings(r: InfillResult) -> dict[str, Any]:
    """``server_slot_stats::to_json``: milliseconds to the microsecond; the first token
    comes with the prompt, so the decode rate counts the steps after it."""
    t_prompt = 0.0
    t_gen = 0.0
    if r.prompt_done_at is not None:
        t_prompt = round((r.prompt_done_at - r.started_at) * 1000, 3)
        if r.last_token_at is not None:
            t_gen = max(0.001, round((r.last_token_at - r.prompt_done_at) * 1000, 3))
    n_prompt = max(0, r.prompt_tokens - r.cached_tokens)
    n_gen = predicted(r)
    steps = max(0, n_gen - 1)
    return {
        "cache_n": r.cached_tokens, "prompt_n": n_prompt, "prompt_ms": t_prompt,
        "prompt_per_token_ms": t_prompt / n_prompt if n_prompt else 0.0,
        "prompt_per_second": 1e3 / t_prompt * n_prompt if t_prompt > 0 else 0.0,
        "predicted_n": n_gen, "predicted_ms": t_gen,
        "predicted_per_token_ms": t_gen / steps if steps else 0.0,
        "predicted_per_second": 1e3 / t_gen * steps if t_gen > 0 else 0.0,
    }


class InfillAnswer:
    """The /infill answer of one in-process generation: the final body, and for a stream
    each partial event."""

    def __init__(self, req: InfillRequest, params: SamplingParams, samplers: Sequence[str],
                 model: str, result: InfillResult) -> None:
        self.req = req
        self.params = params
        self.samplers = samplers
        self.model = model
        self.result = result
        self._ids_sent = 0

    def final(self) -> bytes:
        r, req = self.result, self.req
        stream = req.stream
        body: dict[str, Any] = {
            "index": 0,
            "content": "" if stream else r.content,
            "tokens": list(r.token_ids or []) if req.return_tokens and not stream else [],
            "id_slot": 0,
            "stop": True,
            "model": self.model,
            "tokens_predicted": predicted(r),
            "tokens_evaluated": r.prompt_tokens,
            "generation_settings": generation_settings(req, self.params, self.samplers),
            "prompt": r.prompt,
            "has_new_line": r.has_new_line,
            "truncated": r.truncated,
            "stop_type": stop_type(r),
            "stopping_word": r.stop_word,
            "tokens_cached": r.kv_tokens,
            "timings": timings(r),
        }
        if req.response_fields:
            body = pick_fields(req.response_fields, body)
        return orjson.dumps(body)

    def partial(self, text: str) -> bytes:
        r = self.result
        ids = r.token_ids or []
        new, self._ids_sent = ids[self._ids_sent:], len(ids)
        return event({"index": 0, "content": text, "tokens": new, "stop": False,
                      "id_slot": -1, "tokens_predicted": r.completion_tokens,
                      "tokens_evaluated": r.prompt_tokens})


# --- /v1/completions with a suffix, through a llama-server's /infill ---------------------


class InfillAsCompletion:
    """A llama-server /infill answer (body or stream) as an OpenAI text completion."""

    def __init__(self, req: CompletionRequest) -> None:
        self.model = req.model
        self.include_usage = req.include_usage
        self.cid = "cmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        self.tpl = ChunkTemplate(obj="text_completion", cid=self.cid, created=self.created,
                                 model=req.model, chat=False, include_usage=req.include_usage)

    @staticmethod
    def _finish(data: dict[str, Any]) -> str:
        return "stop" if data.get("stop_type") in ("eos", "word") else "length"

    @staticmethod
    def _usage(data: dict[str, Any]) -> tuple[int, int]:
        return int(data.get("tokens_evaluated") or 0), int(data.get("tokens_predicted") or 0)

    def body(self, content: bytes) -> bytes:
        data = orjson.loads(content)
        prompt, completion = self._usage(data)
        return orjson.dumps({
            "id": self.cid, "object": "text_completion", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "text": data.get("content", ""), "logprobs": None,
                         "finish_reason": self._finish(data)}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion},
        })

    def block(self, data: bytes) -> bytes:
        out: list[bytes] = []
        for ev in data.split(b"\n\n"):
            if not ev.startswith(b"data: "):
                continue
            try:
                item = orjson.loads(ev[6:])
            except orjson.JSONDecodeError:
                continue
            if not isinstance(item, dict) or "error" in item:
                out.append(ev + b"\n\n")  # the relay turns it into our error event
                continue
            if item.get("content"):
                out.append(self.tpl.text(str(item["content"])))
            if item.get("stop") is True:
                out.append(self.tpl.finish(self._finish(item)))
                if self.include_usage:
                    out.append(self.tpl.usage(*self._usage(item)))
                out.append(DONE)
        return b"".join(out)
