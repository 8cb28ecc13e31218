"""``/docs``: the API's operations as one self-contained page.

FastAPI's Swagger UI loads its scripts from a public CDN, so on a machine without internet
(the usual place for a local model server) it shows nothing. This page is rendered here
from the same OpenAPI document, with nothing to fetch; ``/openapi.json`` is the full one.
"""

from __future__ import annotations

import html
from typing import Any

from starlette.responses import HTMLResponse

_METHODS = ("get", "post", "put", "patch", "delete")
_STYLE = ("body{font:15px/1.45 system-ui,sans-serif;max-width:60em;margin:2em auto;"
          "padding:0 1em}code{font-size:.95em}td{padding:.25em .8em;vertical-align:top}"
          "td:first-child{font-weight:600}")


def docs_page(openapi: dict[str, Any]) -> HTMLResponse:
    info = openapi.get("info", {})
    rows = []
    for path, operations in openapi.get("paths", {}).items():
        for method in _METHODS:
            op = operations.get(method)
            if op is None:
                continue
            fields = ", ".join(sorted(_body_fields(openapi, op)))
            rows.append(f"<tr><td>{method.upper()}</td><td><code>{html.escape(path)}</code></td>"
                        f"<td>{html.escape(op.get('summary', ''))}"
                        + (f"<br><small>{html.escape(fields)}</small>" if fields else "")
                        + "</td></tr>")
    title = html.escape(f"{info.get('title', 'API')} {info.get('version', '')}")
    return HTMLResponse(
        f"<!doctype html><html><head><meta charset=utf-8><title>{title}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{title}</h1>"
        f"<p>{html.escape(info.get('summary', ''))}. The full OpenAPI document: "
        "<a href=\"/openapi.json\"><code>/openapi.json</code></a> (open it in any OpenAPI "
        "viewer).</p><table>" + "".join(rows) + "</table></body></html>")


def _body_fields(openapi: dict[str, Any], op: dict[str, Any]) -> list[str]:
    """The top-level fields of an operation's JSON body, from its schema."""
    content = op.get("requestBody", {}).get("content", {}).get("application/json", {})
    ref = content.get("schema", {}).get("$ref", "")
    schema = openapi.get("components", {}).get("schemas", {}).get(ref.rpartition("/")[2], {})
    return list(schema.get("properties", {}))
