"""A chat buffer's text, read and written (pure functions): markdown, one heading per turn.

    ## System                       the chat's system prompt (optional)
    ## You                          a message, with any context attached to it as
    ### Context: … + a fenced block  sections (folded in the window)
    ## gemma-3-270m (ml-offload)    an answer, headed by the model that really answered
    _32 tokens · 14.2 tok/s · … _   its status line (ours: never sent back to the model)

Headings inside fenced code blocks do not count, so an answer's own ``## Section`` or a
``## comment`` in attached code stays text. What the buffer says is what is sent: edit an
earlier answer or the system prompt and the next request carries the edit.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

USER_HEADING = "## You"
SYSTEM_HEADING = "## System"
ASSISTANT_HEADING = re.compile(r"^## (.+) \(ml-offload\)\s*$")
CONTEXT_HEADING = "### Context: "
NOTE_PREFIX = "> ml-offload: "  # our notes in a message (what was left out)
STATUS_LINE = re.compile(r"^_(?:.+ · .+|error: .+)_$")
FENCE = re.compile(r"^(`{3,}|~{3,})")
TITLE_WIDTH = 60


@dataclasses.dataclass(frozen=True)
class Turn:
    role: str  # "system", "user" or "assistant"
    lines: tuple[str, ...]
    model: str = ""  # an answer's heading
    row: int = 0  # 0-based line of the heading

    @property
    def text(self) -> str:
        """What is sent: our notes and an answer's status line left out."""
        lines = [line for line in self.lines if not line.startswith(NOTE_PREFIX)]
        if self.role == "assistant":
            while lines and not lines[-1].strip():
                lines.pop()
            if lines and STATUS_LINE.match(lines[-1]):
                lines.pop()
        return "\n".join(lines).strip()

    @property
    def typed(self) -> str:
        """A message without its attached context sections and notes: what the user typed."""
        keep: list[str] = []
        skip_until: str | None = None
        pending_heading = False
        for line in self.lines:
            if skip_until is not None:
                if line == skip_until:
                    skip_until = None
                continue
            if pending_heading:
                pending_heading = False
                fence = FENCE.match(line)
                if fence:
                    skip_until = fence.group(1)
                    continue
            if line.startswith(CONTEXT_HEADING):
                pending_heading = True
                continue
            if line.startswith(NOTE_PREFIX):
                continue
            keep.append(line)
        return "\n".join(keep).strip()


def _heading(line: str) -> tuple[str, str] | None:
    if line.rstrip() == USER_HEADING:
        return "user", ""
    if line.rstrip() == SYSTEM_HEADING:
        return "system", ""
    m = ASSISTANT_HEADING.match(line)
    if m:
        return "assistant", m.group(1)
    return None


def parse(lines: Sequence[str]) -> list[Turn]:
    """The turns of a chat buffer, in order; text before the first heading is ignored."""
    turns: list[Turn] = []
    role: str | None = None
    model, row = "", 0
    body: list[str] = []
    fence: str | None = None

    def close() -> None:
        if role is not None:
            turns.append(Turn(role, tuple(body), model, row))

    for i, line in enumerate(lines):
        if fence is not None:
            if line.strip() == fence:
                fence = None
            body.append(line)
            continue
        opened = FENCE.match(line)
        if opened:
            fence = opened.group(1)
            body.append(line)
            continue
        head = _heading(line)
        if head is None:
            body.append(line)
            continue
        close()
        role, model = head
        row, body = i, []
    close()
    return turns


def pending_message(turns: Sequence[Turn]) -> Turn | None:
    """The message to send: the last turn, when it is a message with something typed."""
    if turns and turns[-1].role == "user" and turns[-1].typed:
        return turns[-1]
    return None


def to_messages(turns: Sequence[Turn]) -> list[dict[str, Any]]:
    """The request's messages: empty turns dropped, neighbours of one role merged (a
    failed answer leaves two messages in a row)."""
    out: list[dict[str, Any]] = []
    for turn in turns:
        text = turn.text
        if not text:
            continue
        if out and out[-1]["role"] == turn.role:
            out[-1]["content"] += "\n\n" + text
        else:
            out.append({"role": turn.role, "content": text})
    return out


def heading(model: str) -> str:
    return f"## {model} (ml-offload)"


def title_of(turns: Sequence[Turn]) -> str:
    """A chat's title: the first line its first message typed."""
    for turn in turns:
        if turn.role == "user":
            for line in turn.typed.splitlines():
                if line.strip():
                    text = line.strip()
                    return text if len(text) <= TITLE_WIDTH else text[:TITLE_WIDTH - 1] + "…"
    return "new chat"


def new_chat(system_prompt: str, prompt: str = "",
             attached: Sequence[str] = ()) -> tuple[list[str], int]:
    """A new chat's lines, and the (1-based) line where the user types."""
    lines: list[str] = []
    if system_prompt.strip():
        lines += [SYSTEM_HEADING, "", *system_prompt.strip().split("\n"), ""]
    lines += [USER_HEADING, ""]
    cursor = len(lines) + 1
    lines += prompt.strip().split("\n") if prompt.strip() else [""]
    if attached:
        lines += ["", *attached]
    return lines, cursor


def with_input(lines: Sequence[str]) -> list[str]:
    """A saved chat, ready for the next message: it ends under a "## You"."""
    out = list(lines)
    while out and not out[-1].strip():
        out.pop()
    turns = parse(out)
    if not turns or turns[-1].role != "user":
        out += ["", USER_HEADING, "", ""]
    elif not turns[-1].typed:
        out += ["", ""]
    return out


def status_line(parts: Sequence[str]) -> str:
    """An answer's last line: "_a · b · c_", on one line."""
    return "_" + " ".join(" · ".join(p for p in parts if p).split()) + "_"


def error_line(message: str) -> str:
    return "_error: " + " ".join(message.split()) + "_"


def usage_parts(tokens: int, rate: float, seconds: float, prompt_tokens: int,
                finish: str | None, where: str, load: Mapping[str, Any] | None = None
                ) -> list[str]:
    """What an answer's status line says: tokens, tok/s, time, prompt, how it ended, where."""
    parts = [f"{tokens} tokens", f"{rate:.1f} tok/s", f"{seconds:.1f} s"]
    if prompt_tokens:
        parts.append(f"{prompt_tokens} prompt tokens")
    if finish == "length":
        parts.append("truncated: max_tokens reached (raise params.max_tokens)")
    else:
        parts.append(f"finished ({finish or 'stop'})")
    parts.append(where)
    if load:
        parts.append(f"model loaded in {load['seconds']:.2f} s ({load['layers']})")
    return parts
