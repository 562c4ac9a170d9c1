"""What every request body must pass before anything reads its fields: bounded JSON nesting, and
no `persona*` fields on routes that would silently drop them."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from personavec_vllm.server.state import PERSONA_ROUTES, PersonaServer, error_response

logger = logging.getLogger(__name__)


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, counted without recursion, stopping past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json_body(raw: bytes, max_depth: int) -> Any:
    """The decoded body; raises `ValueError` with a client-facing message."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ValueError(f"request body is nested too deeply (at most {max_depth} levels)") from None
    except ValueError:
        raise ValueError("request body is not valid JSON") from None
    if json_depth(body, max_depth) > max_depth:
        raise ValueError(f"request body is nested too deeply (at most {max_depth} levels)")
    return body


async def read_json(raw_request: Request, server: PersonaServer) -> dict[str, Any] | JSONResponse:
    try:
        body = parse_json_body(await raw_request.body(), server.max_json_depth)
    except ValueError as exc:
        return error_response(400, str(exc))
    if not isinstance(body, dict):
        return error_response(400, "request body must be a JSON object")
    return body


class PersonaFieldGuard:
    """ASGI middleware: a POST to any route other than the two persona routes that carries a
    top-level `persona*` field gets a 400 naming it, instead of vLLM silently dropping it.
    Bodies are scanned only when they contain the text "persona", so other traffic pays a
    substring search."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or path in PERSONA_ROUTES
            or path.startswith("/v1/persona/")
        ):
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        body = b""
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        field = self._persona_field(body) if b"persona" in body.lower() else None
        if field is not None:
            response = error_response(
                400, f"{field}: persona fields are supported on {' and '.join(PERSONA_ROUTES)} only", field
            )
            await response(scope, receive, send)
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    def _persona_field(body: bytes) -> str | None:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            return None  # not JSON: the route answers for itself
        if not isinstance(data, dict):
            return None
        return next((k[:64] for k in data if k.lower().startswith("persona")), None)
