"""Ollama's request bodies (its docs/api.md), as lenient as Ollama: unknown fields and unknown
``options`` are accepted and ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..schemas import MAX_EMBED_INPUTS, MAX_MESSAGES, MAX_STOP, KeepAlive, ModelName

# Ollama's format: "" or "json", or a JSON schema object.
Format = Literal["", "json"] | dict[str, Any] | None
Images = list[str] | None


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class Options(_Lenient):
    """The runtime options that map onto the OpenAI request; the rest are ignored."""

    num_predict: int | None = Field(None, description="max_tokens; -1 or -2: the server's "
                                    "default (--default-max-tokens)")
    num_ctx: int | None = Field(None, ge=1, description="at most the context the model is "
                                "loaded with; more is refused with 400")
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP)
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None
    images: Images = None
    tool_calls: list[Any] | None = None


class _Generation(_Lenient):
    model: ModelName
    stream: bool = Field(True, description="NDJSON lines by default (unlike OpenAI)")
    format: Format = None
    options: Options | None = None
    keep_alive: KeepAlive = None
    think: bool | str | None = None


class ChatRequest(_Generation):
    messages: Annotated[list[Message], Field(max_length=MAX_MESSAGES)] = []
    tools: list[Any] | None = None


class GenerateRequest(_Generation):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: Images = None


class EmbedRequest(_Lenient):
    model: ModelName
    input: str | Annotated[list[str], Field(max_length=MAX_EMBED_INPUTS)] = ""
    truncate: bool = True
    options: Options | None = None
    keep_alive: KeepAlive = None
    dimensions: int | None = Field(None, ge=1)


class EmbeddingsRequest(_Lenient):
    model: ModelName
    prompt: str = ""
    options: Options | None = None
    keep_alive: KeepAlive = None


class ShowRequest(_Lenient):
    model: ModelName
    verbose: bool = False

    @model_validator(mode="before")
    @classmethod
    def _old_name(cls, data: Any) -> Any:
        """Older clients send ``name`` instead of ``model``."""
        if isinstance(data, dict) and "model" not in data and "name" in data:
            return {**data, "model": data["name"]}
        return data
