"""Ollama's error shape, ``{"error": "message"}``, on Ollama's paths only.

Our own ``/api/health``, ``/api/backend/info`` and ``/api/models/…`` keep the OpenAI shape.
"""

from __future__ import annotations

import orjson
from starlette.responses import Response

from ..errors import APIError, error_response

PATHS = frozenset({
    "/api/version", "/api/tags", "/api/show", "/api/ps", "/api/chat", "/api/generate",
    "/api/embed", "/api/embeddings", "/api/pull", "/api/push", "/api/create", "/api/copy",
    "/api/delete",
})
BLOBS = "/api/blobs/"


def is_ollama_path(path: str) -> bool:
    return path in PATHS or path.startswith(BLOBS)


def body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def ollama_error(exc: APIError) -> Response:
    return Response(body(exc.message), status_code=exc.status, media_type="application/json",
                    headers=exc.headers)


def render_error(path: str, exc: APIError) -> Response:
    """The error response for ``path``: Ollama's shape on its paths, OpenAI's elsewhere."""
    return ollama_error(exc) if is_ollama_path(path) else error_response(exc)
