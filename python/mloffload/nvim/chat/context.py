"""Context attached to a message (pure functions): the ``#buffer``, ``#buffers``,
``#file:path`` and ``#diagnostics`` a message names, a selection, as folded
``### Context:`` sections, and fitting them into the model's context window.

The Lua layer gathers the text (``lua/ml-offload/chat/context.lua``); this decides what is
attached and says what had to be cut or left out.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .transcript import CONTEXT_HEADING, FENCE, NOTE_PREFIX

REF = re.compile(r"(?<![\w#/])#(buffers|buffer|diagnostics|file:(\S+))(?!\w)")
RESERVE_TOKENS = 64  # the chat template's own tokens, and some slack
MIN_CUT_LINES = 3  # fewer than this: leave the item out rather than cut it


def estimate_tokens(text: str) -> int:
    """A cautious guess without the model's tokenizer: about 3 characters a token."""
    return len(text) // 3 + 1


@dataclasses.dataclass(frozen=True)
class Ref:
    kind: str  # "buffer", "buffers", "file" or "diagnostics"
    arg: str
    ref: str  # as written: "#file:src/a.py"

    def to_lua(self) -> dict[str, str]:
        return {"kind": self.kind, "arg": self.arg, "ref": self.ref}


def refs_in(text: str) -> list[Ref]:
    """The references in what the user typed, once each, outside fenced code."""
    out: list[Ref] = []
    seen: set[str] = set()
    fence: str | None = None
    for line in text.split("\n"):
        opened = FENCE.match(line)
        if fence is not None:
            if line.strip() == fence:
                fence = None
            continue
        if opened:
            fence = opened.group(1)
            continue
        for m in REF.finditer(line):
            ref = m.group(0).rstrip(".,;:!?)")
            if ref in seen:
                continue
            seen.add(ref)
            if m.group(2) is not None:
                out.append(Ref("file", ref[len("#file:"):], ref))
            else:
                out.append(Ref(m.group(1), "", ref))
    return out


@dataclasses.dataclass(frozen=True)
class Item:
    """One piece of context, as the Lua layer gathered it."""

    ref: str
    file: str = ""
    filetype: str = ""
    first: int = 0
    last: int = 0
    text: str = ""
    error: str = ""

    @classmethod
    def from_lua(cls, raw: Mapping[str, Any]) -> Item:
        def num(key: str) -> int:
            try:
                return int(raw.get(key) or 0)
            except (TypeError, ValueError):
                return 0

        return cls(ref=str(raw.get("ref") or ""), file=str(raw.get("file") or ""),
                   filetype=str(raw.get("filetype") or ""), first=num("first"),
                   last=num("last"), text=str(raw.get("text") or ""),
                   error=str(raw.get("error") or ""))

    def label(self, cut: tuple[int, int] | None = None) -> str:
        where = self.file or "?"
        details = [self.filetype] if self.filetype else []
        if cut is not None:
            details.append(f"lines {cut[0]}–{cut[1]} of {self.last}, cut to fit")
        elif self.last:
            details.append(f"lines {self.first}–{self.last}")
        return f"{self.ref} · {where}" + (f" ({', '.join(details)})" if details else "")


def fence_for(text: str) -> str:
    fence = "```"
    while any(line.lstrip().startswith(fence) for line in text.split("\n")):
        fence += "`"
    return fence


def section(label: str, filetype: str, text: str) -> list[str]:
    fence = fence_for(text)
    return [CONTEXT_HEADING + label, fence + filetype, *text.split("\n"), fence]


def selection_section(sel: Mapping[str, Any]) -> list[str]:
    """A selection as attached to a new chat: file, filetype, line range (and columns of a
    charwise one), and exactly the text selected."""
    first, last = int(sel.get("first") or 0), int(sel.get("last") or 0)
    where = f"lines {first}–{last}" if first != last else f"line {first}"
    if sel.get("charwise"):
        where = (f"line {first} column {sel.get('first_col')} to line {last} column "
                 f"{sel.get('last_col')}")
    filetype = str(sel.get("filetype") or "")
    details = ", ".join(x for x in (filetype, where) if x)
    label = f"selection · {sel.get('file') or '?'} ({details})"
    return section(label, filetype, str(sel.get("text") or ""))


@dataclasses.dataclass(frozen=True)
class Fitted:
    lines: list[str]  # the sections to attach, each preceded by a blank line
    notes: list[str]  # what was cut or left out, and why


def fit(items: Sequence[Item], budget: int | None, n_ctx: int | None) -> Fitted:
    """Attach items in order while they fit in ``budget`` tokens (no limit when None);
    cut the one that does not (by lines) or leave it out, and say so."""
    lines: list[str] = []
    notes: list[str] = []
    left = budget
    why = f"the model's context is {n_ctx} tokens" if n_ctx else "the model's context is full"
    for item in items:
        if item.error:
            notes.append(f"{NOTE_PREFIX}{item.ref}: {item.error}")
            continue
        whole = section(item.label(), item.filetype, item.text)
        cost = estimate_tokens("\n".join(whole))
        if left is None or cost <= left:
            lines += ["", *whole]
            left = None if left is None else left - cost
            continue
        rows = item.text.split("\n")
        room = left - estimate_tokens("\n".join(section(item.label((1, 1)), item.filetype, "")))
        keep, used = 0, 0
        while keep < len(rows) and used + estimate_tokens(rows[keep]) + 1 <= room:
            used += estimate_tokens(rows[keep]) + 1
            keep += 1
        size = f"{len(rows)} lines, about {cost} tokens"
        if keep >= MIN_CUT_LINES:
            first = item.first or 1
            cut = (first, first + keep - 1)
            lines += ["", *section(item.label(cut), item.filetype, "\n".join(rows[:keep]))]
            notes.append(f"{NOTE_PREFIX}{item.ref} {item.file}: cut to lines {cut[0]}–{cut[1]} "
                         f"of {size}: {why}")
            left -= used
        else:
            notes.append(f"{NOTE_PREFIX}left out {item.ref} {item.file} ({size}): {why}")
    return Fitted(lines, notes)


def budget_for(n_ctx: int | None, max_tokens: int | None, messages: Sequence[Mapping[str, Any]]
               ) -> int | None:
    """Tokens left for attached context: the context, less the answer's room and the
    conversation so far."""
    if not n_ctx:
        return None
    used = sum(estimate_tokens(str(m.get("content") or "")) for m in messages)
    answer = max_tokens if max_tokens is not None else n_ctx // 4
    return max(0, n_ctx - min(answer, n_ctx // 2) - used - RESERVE_TOKENS)
