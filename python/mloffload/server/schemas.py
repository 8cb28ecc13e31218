"""Request and response shapes of the OpenAI-compatible endpoints (and /openapi.json)."""

from __future__ import annotations

import base64
import struct
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from ..config import Settings
from ..engine.base import SamplingParams, sampling_from
from ..engine.fim import DEFAULT_SAMPLERS, InfillInput, sampler_names

MAX_MESSAGES = 2048
MAX_STOP = 16
MAX_STOP_LEN = 256
MAX_EMBED_INPUTS = 2048
MAX_MODEL_NAME = 256
MAX_EXTRA_CHUNKS = 1024
MAX_RESPONSE_FIELDS = 256
RANDOM_SEED = 2**32 - 1  # llama.cpp's LLAMA_DEFAULT_SEED: a random seed each time



def _unicode_text(value: str) -> str:
    """JSON may escape a lone UTF-16 surrogate (``\\ud800``); no engine, log or response can
    encode it, so it is the client's error, named by its field."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the text holds a lone UTF-16 surrogate (U+{ord(value[exc.start]):04X} "
                         f"at character {exc.start}); send valid Unicode") from None
    return value


Text = Annotated[str, AfterValidator(_unicode_text)]
ModelName = Annotated[Text, Field(min_length=1, max_length=MAX_MODEL_NAME)]
KeepAlive = Annotated[
    str | float | None,
    Field(description="Unload the model this long after the response (0: right away; "
          "negative: never); a duration like '5m' or seconds. Default: the server's."),
]


class _Lenient(BaseModel):
    # Unknown OpenAI fields (user, logit_bias, ...) are accepted and ignored.
    model_config = ConfigDict(extra="allow")


class TextPart(_Lenient):
    type: Literal["text"]
    text: Text


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class _Sampling(_Lenient):
    model: ModelName = "default"
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=0, le=1000)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repeat_penalty: float = Field(1.0, ge=0.0, le=10.0)
    max_tokens: int | None = Field(None, ge=1, description="capped by the context left")
    stop: Text | list[Annotated[Text, Field(max_length=MAX_STOP_LEN)]] | None = Field(
        None, max_length=MAX_STOP
    )
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    keep_alive: KeepAlive = None
    response_format: dict[str, Any] | None = Field(
        None, description="{'type': 'json_object'} or {'type': 'json_schema', 'json_schema': "
        "{'schema': ...}}: where the engine can constrain its output (llama-server); refused "
        "with 400 where it cannot")

    @property
    def wants_format(self) -> bool:
        """Whether the answer must follow a format (anything but plain text)."""
        fmt = self.response_format
        return fmt is not None and fmt.get("type", "text") != "text"

    @field_validator("stop")
    @classmethod
    def _stop_len(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, str) and len(v) > MAX_STOP_LEN:
            raise ValueError(f"a stop string may have at most {MAX_STOP_LEN} characters")
        return v

    def sampling(self, settings: Settings | None = None) -> SamplingParams:
        """This request's sampling, with the server's max_tokens default and cap."""
        return sampling_from(self.model_dump(), settings.token_limit if settings else None)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)

    def message_dicts(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] = Field(..., description="one prompt (a list of one is accepted)")
    suffix: Text | None = Field(
        None, description="text after the completion: fill in the middle between prompt and "
        "suffix (the model needs FIM tokens, else 400 fim_unsupported; without a model "
        "named, the fim_model answers)")
    max_tokens: int | None = Field(16, ge=1, description="capped by the context left")
    echo: bool = False

    @model_validator(mode="after")
    def _no_echo_with_suffix(self) -> CompletionRequest:
        if self.echo and self.suffix is not None:
            raise ValueError("'echo' cannot be combined with 'suffix'")
        return self

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return v

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class EmbeddingRequest(_Lenient):
    model: ModelName = "default"
    input: Text | list[Text] = Field(..., description="a string or a list of strings")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    keep_alive: KeepAlive = None

    @field_validator("input")
    @classmethod
    def _inputs(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items:
            raise ValueError("at least one input is required")
        if len(items) > MAX_EMBED_INPUTS:
            raise ValueError(f"at most {MAX_EMBED_INPUTS} inputs per request")
        if any(not s for s in items):
            raise ValueError("inputs must not be empty strings")
        return v

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# --- llama-server's own endpoints: /infill, /tokenize, /detokenize -------------------

# Token ids as JSON gives them; ids past the vocabulary are the engine's to refuse.
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
MixedPrompt = Text | list[Text | TokenId]


class ExtraChunk(_Lenient):
    text: Text
    filename: Text = "tmp"


class InfillRequest(_Lenient):
    """llama-server's ``/infill`` (see its README): fill in between ``input_prefix`` and
    ``input_suffix``, with ``input_extra`` chunks of other files as context. Fields llama-server
    takes besides these are accepted; managed mode passes them to the engine."""

    model: ModelName | None = Field(None, description="default: the fim_model setting")
    input_prefix: MixedPrompt
    input_suffix: MixedPrompt
    input_extra: list[ExtraChunk] = Field(default_factory=list, max_length=MAX_EXTRA_CHUNKS)
    prompt: Text = Field("", description="added after the FIM_MID token's prefix part")
    n_predict: int = Field(-1, ge=-1, validation_alias=AliasChoices("n_predict", "max_tokens"),
                           description="-1: the server's default_max_tokens")
    n_indent: int = Field(0, ge=0, description="minimum indentation of each new line")
    t_max_prompt_ms: int = Field(-1, description="accepted; llama-server does not "
                                 "implement it either")
    t_max_predict_ms: int = Field(-1, ge=-1, description="after a newline, stop once "
                                  "generating took longer than this")
    stop: Text | list[Annotated[Text, Field(max_length=MAX_STOP_LEN)]] | None = Field(
        None, max_length=MAX_STOP)
    samplers: list[str] | str | None = None
    top_k: int = Field(40, ge=0, le=1_000_000)
    top_p: float = Field(0.95, ge=0.0, le=1.0)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    temperature: float = Field(0.8, ge=0.0, le=100.0)
    repeat_penalty: float = Field(1.0, ge=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int = Field(-1, ge=-1, le=RANDOM_SEED, description="-1: random")
    cache_prompt: bool = True
    return_tokens: bool = False
    id_slot: int = -1
    response_fields: list[str] | None = Field(None, max_length=MAX_RESPONSE_FIELDS)
    stream: bool = False
    keep_alive: KeepAlive = None

    def sampling(self, settings: Settings | None = None) -> SamplingParams:
        """n_predict -1 takes the server's default and cap; 0 still makes one token, as
        llama-server does (its first token is never checked against the limit)."""
        wanted = None if self.n_predict < 0 else max(1, self.n_predict)
        values: dict[str, Any] = {
            "max_tokens": settings.token_limit(wanted) if settings else wanted,
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "min_p": self.min_p, "repeat_penalty": self.repeat_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "stop": self.stop,
            "seed": None if self.seed in (-1, RANDOM_SEED) else self.seed,
        }
        return sampling_from(values)

    def infill_input(self) -> InfillInput:
        return InfillInput(
            input_prefix=self.input_prefix, input_suffix=self.input_suffix,
            input_extra=tuple((c.filename, c.text) for c in self.input_extra),
            prompt=self.prompt, n_indent=self.n_indent, t_max_predict_ms=self.t_max_predict_ms,
            samplers=DEFAULT_SAMPLERS if self.samplers is None else sampler_names(self.samplers),
            cache_prompt=self.cache_prompt)


class TokenizeRequest(_Lenient):
    model: ModelName = "default"
    content: MixedPrompt
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Lenient):
    model: ModelName = "default"
    tokens: list[TokenId] = Field(default_factory=list)


# --- responses (documentation in /openapi.json; handlers build plain dicts) ---------


def embedding_list(vectors: list[list[float]], model: str, prompt_tokens: int,
                   encoding_format: str) -> dict[str, Any]:
    """The `/v1/embeddings` answer; ``base64`` packs each vector as little-endian float32."""
    data = []
    for i, vec in enumerate(vectors):
        emb: Any = vec
        if encoding_format == "base64":
            emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class EmbeddingItem(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    meta: dict[str, Any] | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": desc}
    for status, desc in {
        400: "invalid request (validation, context length)",
        401: "missing or wrong API key",
        404: "unknown model",
        413: "request body too large",
        415: "body is not JSON",
        429: "queue full (see Retry-After)",
        500: "internal error",
        503: "model loading or backend unavailable",
    }.items()
}
