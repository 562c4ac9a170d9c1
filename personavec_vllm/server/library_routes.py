"""The vector library routes: `GET /v1/persona/vectors`, and (with the admin key)
`POST` / `DELETE /v1/persona/vectors/{name}`."""

from __future__ import annotations

import hmac
import logging

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from personavec_vllm import config
from personavec_vllm.library import LibraryFull
from personavec_vllm.server.api import VectorInfo
from personavec_vllm.server.state import PersonaServer, error_response, server_state
from personavec_vllm.vectors import VectorFileError, is_valid_name

logger = logging.getLogger(__name__)


def admin_error(raw_request: Request, server: PersonaServer) -> JSONResponse | None:
    """403 when the admin API is off; 401 unless `Authorization: Bearer <the admin key>`."""
    if server.admin_key is None:
        return error_response(
            403, f"the vector admin API is disabled; set {config.ADMIN_KEY} to enable it", type_="PermissionDeniedError"
        )
    scheme, _, token = raw_request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    # Header values arrive as latin-1 text; compare bytes, so any byte sequence is just "wrong".
    given = token.encode("latin-1", errors="replace")
    if scheme.lower() != "bearer" or not token or not hmac.compare_digest(given, server.admin_key.encode()):
        return error_response(
            401, "a valid admin key is required (Authorization: Bearer <key>)", type_="AuthenticationError"
        )
    return None


async def read_upload(raw_request: Request, limit: int) -> bytes | JSONResponse:
    """The body, at most `limit` bytes: refused from its Content-Length before reading, or as
    soon as a chunked body passes the limit."""
    too_large = error_response(
        413,
        f"a vector file may be at most {limit} bytes ({config.MAX_UPLOAD_BYTES})",
        "body",
        type_="RequestEntityTooLarge",
    )
    length = raw_request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            return error_response(400, "bad Content-Length", "body")
        if int(length) > limit:
            return too_large
    data = bytearray()
    async for chunk in raw_request.stream():
        data += chunk
        if len(data) > limit:
            return too_large
    return bytes(data)


async def list_vectors(raw_request: Request) -> JSONResponse:
    library = server_state(raw_request).library
    library.refresh()
    data = []
    for name in library.names():
        vector = library.get(name)
        if vector is not None:
            data.append(VectorInfo.of(vector).model_dump())
    return JSONResponse({"object": "list", "data": data})


async def add_vector(raw_request: Request, name: str) -> Response:
    """Upload a vector file (the request body is the `.safetensors` file)."""
    server = server_state(raw_request)
    if (denied := admin_error(raw_request, server)) is not None:
        return denied
    if not is_valid_name(name):
        return error_response(
            400, "vector name must be 1-64 letters, digits, '_', '-', '.', starting with a letter or digit", "name"
        )
    library = server.library
    if library.directory is None:
        return error_response(409, "the server has no vector directory (--vectors) to add to", "name")
    if library.get(name) is not None:
        return error_response(409, f"vector {name!r} exists; DELETE it first", "name")
    data = await read_upload(raw_request, server.max_upload)
    if isinstance(data, JSONResponse):
        return data
    try:
        vector = library.install(name, data)
    except LibraryFull as exc:
        return error_response(409, str(exc), "name", type_="ConflictError")
    except VectorFileError as exc:
        return error_response(400, str(exc), "body")
    return JSONResponse(VectorInfo.of(vector).model_dump(), status_code=201)


async def delete_vector(raw_request: Request, name: str) -> Response:
    server = server_state(raw_request)
    if (denied := admin_error(raw_request, server)) is not None:
        return denied
    if name in server.policy.current.vectors():
        return error_response(
            409,
            f"the server policy (version {server.policy.current.version}) uses vector {name!r}; change it first",
            "name",
            type_="ConflictError",
        )
    if not server.library.remove(name):
        return error_response(404, f"no vector named {name[:64]!r}", "name", type_="NotFoundError")
    return JSONResponse({"deleted": name})
