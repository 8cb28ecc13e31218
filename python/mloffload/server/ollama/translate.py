"""Ollama requests as the OpenAI requests every backend takes.

Generations always go to the backend as streams with usage (``/api/chat`` and
``/api/generate`` stream by default, and a non-streamed answer is folded from the same
events), so one translation serves both.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from ..errors import APIError, validation_error
from ..manager import parse_keep_alive
from ..schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from .schemas import ChatRequest, EmbeddingsRequest, EmbedRequest, GenerateRequest, Options

# Ollama option → OpenAI field; the sampling ones keep their names.
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "repeat_penalty",
            "presence_penalty", "frequency_penalty")
_OLLAMA_NAME = {**{k: f"options.{k}" for k in SAMPLING}, "max_tokens": "options.num_predict",
                "response_format": "format", "suffix": "suffix"}

R = TypeVar("R", bound=BaseModel)


def model_name(name: str) -> str:
    """Ollama's ``name:latest`` is plain ``name`` here (registry ids never hold a colon)."""
    return name.removesuffix(":latest")


def _refuse(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


def refuse_unsupported(req: ChatRequest | GenerateRequest) -> None:
    """What this server cannot do is refused with a reason, never silently dropped."""
    if req.think:
        raise _refuse("think", "'think' is not supported: the models here do not separate "
                      "their thinking from the answer. Leave it out or send false.")
    if isinstance(req, ChatRequest):
        if req.tools:
            raise _refuse("tools", "'tools' (function calling) is not supported by this "
                          "server's Ollama API; send the chat without tools.")
        if any(m.images for m in req.messages):
            raise _refuse("messages.images", "Images are not supported: the models here "
                          "read text only.")
        return
    if req.images:
        raise _refuse("images", "Images are not supported: the models here read text only.")
    if req.template:
        raise _refuse("template", "'template' (a Go template) is not supported; the model's "
                      "own chat format is used, or send raw: true with a formatted prompt.")
    if req.context:
        raise _refuse("context", "'context' (token ids from an earlier answer) is not "
                      "supported; use /api/chat with the conversation in 'messages'.")


def _format(value: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if not value:
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": value}}
    raise _refuse("format", f"'format' must be \"json\" or a JSON schema, not {value!r}.")


def _common(req: ChatRequest | GenerateRequest) -> dict[str, Any]:
    opts = req.options or Options.model_validate({})
    out: dict[str, Any] = {
        "model": model_name(req.model), "stream": True,
        "stream_options": {"include_usage": True},
        # Always named (None: the server's default), so a raw completion does not get
        # OpenAI's 16 tokens; the backend applies the server's default and cap.
        "max_tokens": opts.num_predict if opts.num_predict and opts.num_predict > 0 else None,
    }
    out.update({k: v for k in SAMPLING if (v := getattr(opts, k)) is not None})
    if req.keep_alive is not None:  # checked here: a proxied backend would not look at it
        out["keep_alive"] = parse_keep_alive(req.keep_alive)
    if (fmt := _format(req.format)) is not None:
        out["response_format"] = fmt
    return out


def build(model: type[R], data: dict[str, Any]) -> R:
    """Validate the OpenAI request; its errors name the Ollama fields the client sent."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            loc = tuple(err.get("loc", ()))
            if loc and str(loc[0]) in _OLLAMA_NAME:
                loc = (*_OLLAMA_NAME[str(loc[0])].split("."), *loc[1:])
            errors.append({**err, "loc": loc})
        raise validation_error(RequestValidationError(errors)) from None


def chat(req: ChatRequest) -> ChatCompletionRequest:
    refuse_unsupported(req)
    messages = [{"role": m.role, "content": m.content or ""} for m in req.messages]
    return build(ChatCompletionRequest, {**_common(req), "messages": messages})


def generate(req: GenerateRequest) -> ChatCompletionRequest | CompletionRequest:
    """A templated prompt is a one-turn chat (the model's chat format is its template); a
    raw prompt, or one with a suffix, is a plain completion."""
    refuse_unsupported(req)
    data = _common(req)
    if req.raw or req.suffix:
        return build(CompletionRequest, {**data, "prompt": req.prompt, "suffix": req.suffix})
    messages = [{"role": "system", "content": req.system}] if req.system else []
    messages.append({"role": "user", "content": req.prompt})
    return build(ChatCompletionRequest, {**data, "messages": messages})


def embeddings(req: EmbedRequest | EmbeddingsRequest) -> EmbeddingRequest:
    data: dict[str, Any] = {"model": model_name(req.model),
                            "keep_alive": parse_keep_alive(req.keep_alive),
                            "input": req.prompt if isinstance(req, EmbeddingsRequest)
                            else req.input}
    if isinstance(req, EmbedRequest) and req.dimensions is not None:
        data["dimensions"] = req.dimensions
    return build(EmbeddingRequest, data)
