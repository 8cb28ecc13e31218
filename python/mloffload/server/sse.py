"""Server-sent events for OpenAI streams, built from pre-encoded byte templates.

Each chunk is ``prefix + orjson.dumps(text) + suffix``: the fields that never change in a
stream (id, created, model) are encoded once, so a token costs one small JSON string encode.
"""

from __future__ import annotations

from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


class ChunkTemplate:
    def __init__(self, *, obj: str, cid: str, created: int, model: str, chat: bool,
                 include_usage: bool) -> None:
        self.obj, self.cid, self.created, self.model = obj, cid, created, model
        self.chat = chat
        self.include_usage = include_usage
        head = (b'data: {"id":' + orjson.dumps(cid) + b',"object":' + orjson.dumps(obj)
                + b',"created":' + str(created).encode() + b',"model":' + orjson.dumps(model)
                + b',"system_fingerprint":null,"choices":[{"index":0,')
        usage = b',"usage":null' if include_usage else b""
        if chat:
            self._prefix = head + b'"delta":{"content":'
            self._suffix = b'},"logprobs":null,"finish_reason":null}]' + usage + b"}\n\n"
        else:
            self._prefix = head + b'"text":'
            self._suffix = b',"logprobs":null,"finish_reason":null}]' + usage + b"}\n\n"

    def _base(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.cid, "object": self.obj, "created": self.created, "model": self.model,
            "system_fingerprint": None, "choices": choices,
        }
        if self.include_usage:
            data["usage"] = None
        return data

    def text(self, text: str) -> bytes:
        return self._prefix + orjson.dumps(text) + self._suffix

    def role(self) -> bytes:
        """The first chat chunk: the assistant role with empty content."""
        return event(self._base([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}]))

    def finish(self, reason: str) -> bytes:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
        if self.chat:
            choice["delta"] = {}
        else:
            choice["text"] = ""
        return event(self._base([choice]))

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        data = self._base([])
        data["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}
        return event(data)
