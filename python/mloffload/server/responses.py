"""Small response helpers every backend and route shares."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")
