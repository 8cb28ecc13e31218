"""Turn OpenAI chat messages into one prompt string for a model.

The GGUF's own Jinja template wins when it has one. Without one (the embedded Gemma 3 270M
ships none), the format is chosen from ``general.architecture``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = dict[str, Any]


class ChatFormatError(ValueError):
    """The messages cannot be rendered (e.g. the template rejected them)."""


@dataclasses.dataclass(frozen=True)
class ChatPrompt:
    text: str
    stop: tuple[str, ...]  # end-of-turn markers that must also end generation


def message_text(message: Message) -> str:
    """Content as text: a string, or the text parts of a content list."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "text":
            parts.append(str(part.get("text", "")))
    return "".join(parts)


def _gemma(messages: Sequence[Message]) -> ChatPrompt:
    # Gemma has no system role: like Google's own template, the system text opens the
    # first user turn.
    system = "\n\n".join(message_text(m) for m in messages if m["role"] in ("system", "developer"))
    out: list[str] = []
    pending_system = system
    for m in messages:
        role = m["role"]
        if role in ("system", "developer"):
            continue
        text = message_text(m)
        if role == "user" and pending_system:
            text = f"{pending_system}\n\n{text}"
            pending_system = ""
        turn = "model" if role == "assistant" else "user"
        out.append(f"<start_of_turn>{turn}\n{text.strip()}<end_of_turn>\n")
    if pending_system:
        out.append(f"<start_of_turn>user\n{pending_system}<end_of_turn>\n")
    out.append("<start_of_turn>model\n")
    # A base model may open a new turn instead of closing its own: that ends the answer too.
    return ChatPrompt("".join(out), ("<end_of_turn>", "<start_of_turn>"))


def _chatml(messages: Sequence[Message]) -> ChatPrompt:
    out = []
    for m in messages:
        role = "system" if m["role"] == "developer" else m["role"]
        out.append(f"<|im_start|>{role}\n{message_text(m)}<|im_end|>\n")
    out.append("<|im_start|>assistant\n")
    return ChatPrompt("".join(out), ("<|im_end|>",))


def _llama3(messages: Sequence[Message]) -> ChatPrompt:
    out = []
    for m in messages:
        role = "system" if m["role"] == "developer" else m["role"]
        out.append(f"<|start_header_id|>{role}<|end_header_id|>\n\n{message_text(m)}<|eot_id|>")
    out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return ChatPrompt("".join(out), ("<|eot_id|>",))


def _mistral(messages: Sequence[Message]) -> ChatPrompt:
    system = "\n\n".join(message_text(m) for m in messages if m["role"] in ("system", "developer"))
    out = []
    first_user = True
    for m in messages:
        if m["role"] == "user":
            text = message_text(m)
            if first_user and system:
                text = f"{system}\n\n{text}"
            first_user = False
            out.append(f"[INST] {text} [/INST]")
        elif m["role"] == "assistant":
            out.append(f" {message_text(m)}</s>")
    return ChatPrompt("".join(out), ("</s>",))


FORMATS: dict[str, Callable[[Sequence[Message]], ChatPrompt]] = {
    "gemma": _gemma,
    "chatml": _chatml,
    "llama-3": _llama3,
    "mistral": _mistral,
}

_BY_ARCHITECTURE = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3n": "gemma",
    "llama": "llama-3",
    "mistral": "mistral",
    "qwen2": "chatml",
    "qwen3": "chatml",
}


def format_for_architecture(architecture: str) -> str:
    return _BY_ARCHITECTURE.get(architecture, "chatml")


class ChatFormatter:
    """Renders messages with the model's template, or a built-in format as a fallback."""

    def __init__(self, template: str, architecture: str, bos_token: str, eos_token: str) -> None:
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template: jinja2.Template | None = None
        if template:
            env = ImmutableSandboxedEnvironment(
                loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True
            )
            env.globals["raise_exception"] = _raise
            env.filters["tojson"] = _tojson
            try:
                self._template = env.from_string(template)
                self.name = "gguf-template"
            except jinja2.TemplateError:
                self._template = None
        if self._template is None:
            self.name = format_for_architecture(architecture)

    def render(self, messages: Sequence[Message]) -> ChatPrompt:
        if self._template is None:
            return FORMATS[self.name](messages)
        try:
            text = self._template.render(
                messages=[{**m, "content": message_text(m)} for m in messages],
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as exc:
            raise ChatFormatError(
                f"the model's chat template rejected the messages: {exc}"
            ) from None
        # The tokenizer adds BOS itself; a template that also writes it would double it.
        if self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token) :]
        return ChatPrompt(text, (self.eos_token,) if self.eos_token else ())


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    import json

    return json.dumps(value, indent=indent, ensure_ascii=False)
