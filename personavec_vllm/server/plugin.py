"""vLLM endpoint plugin (entry point group `vllm.endpoint_plugins`): persona fields on the
OpenAI routes, the vector library routes, and metrics.

A request's path: `completion_route` reads the body, takes and validates the persona fields
(`api.take_persona_fields`), hands the rest to vLLM's own handler with the spec in
`vllm_xargs`, then adds the `persona` object (projections from the worker via the sink) to the
JSON response or as a last stream chunk, and records metrics.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from personavec_vllm.server.api import PersonaRequest, VectorInfo, take_persona_fields
from personavec_vllm.server.metrics import PersonaMetrics
from personavec_vllm.spec import Limits, PersonaSpecError
from personavec_vllm.vectors import NAME_PATTERN, VectorFileError, load_vector

logger = logging.getLogger(__name__)

ADMIN_KEY_ENV = "PERSONAVEC_ADMIN_KEY"
COLLECT_TIMEOUT_S = 60.0


def error_response(status: int, message: str, param: str | None = None, type_: str = "BadRequestError") -> JSONResponse:
    """OpenAI-style error body, as vLLM returns its own."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}}, status_code=status)


class PersonaServer:
    """Per-app state: the vector library the engine uses, limits, metrics, the projection sink."""

    def __init__(self, library, model_name: str, sink):
        self.library = library
        self.limits = Limits.from_env()
        self.metrics = PersonaMetrics(model_name)
        self.sink = sink
        self.admin_key = os.environ.get(ADMIN_KEY_ENV) or None

    async def projections_for(self, persona: PersonaRequest) -> dict:
        if not persona.monitors:
            return {}
        projections = await self.sink.acollect(persona.spec.request_key, timeout=COLLECT_TIMEOUT_S)
        vectors = {name: self.library.get(name) for name in projections}
        self.metrics.observe_projections(projections, vectors)
        return projections


def _state(request: Request) -> PersonaServer:
    return request.app.state.personavec


async def _read_json(raw_request: Request) -> dict[str, Any] | JSONResponse:
    try:
        body = await raw_request.json()
    except ValueError:
        return error_response(400, "request body is not valid JSON")
    if not isinstance(body, dict):
        return error_response(400, "request body must be a JSON object")
    return body


def completion_route(original, request_model):
    """Our handler for a vLLM completion route (`original` is vLLM's endpoint function)."""

    async def endpoint(raw_request: Request):
        server = _state(raw_request)
        body = await _read_json(raw_request)
        if isinstance(body, JSONResponse):
            return body
        try:
            persona = take_persona_fields(body, server.library, server.limits)
        except PersonaSpecError as exc:
            server.metrics.reject(exc.reason)
            return error_response(400, str(exc), exc.field)
        try:
            request = request_model.model_validate(body)
        except ValidationError as exc:
            from fastapi.exceptions import RequestValidationError

            raise RequestValidationError(exc.errors()) from exc
        if persona is None:
            return await original(request, raw_request)
        request.vllm_xargs = {**(request.vllm_xargs or {}), **persona.extra_args()}
        if persona.monitors:
            server.sink.expect(persona.spec.request_key, [(t.vector, l) for t in persona.spec.monitor for l in t.layers])
        response = await original(request, raw_request)
        if isinstance(response, StreamingResponse):
            server.metrics.observe_request(persona.spec)
            return StreamingResponse(_stream_with_persona(response.body_iterator, persona, server),
                                     status_code=response.status_code, media_type=response.media_type,
                                     headers={k: v for k, v in response.headers.items() if k.lower() != "content-length"})
        if response.status_code != 200:
            server.sink.discard(persona.spec.request_key)
            return response
        server.metrics.observe_request(persona.spec)
        content = json.loads(response.body)
        content["persona"] = await _persona_json(persona, server)
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        return JSONResponse(content, headers=headers)

    return endpoint


async def _persona_json(persona: PersonaRequest, server: PersonaServer) -> dict:
    try:
        projections = await server.projections_for(persona)
    except (TimeoutError, RuntimeError) as exc:
        logger.error("personavec: %s", exc)
        out = persona.response_object(None).to_json()
        out["error"] = str(exc)
        return out
    return persona.response_object(projections).to_json()


async def _stream_with_persona(chunks, persona: PersonaRequest, server: PersonaServer):
    """Pass vLLM's SSE chunks through; before `[DONE]`, one chunk carrying `persona`."""
    last: dict[str, Any] = {}
    async for chunk in chunks:
        text = chunk.decode() if isinstance(chunk, bytes) else chunk
        if text.strip() == "data: [DONE]":
            payload = {k: last[k] for k in ("id", "object", "created", "model") if k in last}
            payload.update(choices=[], persona=await _persona_json(persona, server))
            yield f"data: {json.dumps(payload)}\n\n"
        elif text.startswith("data: {"):
            try:
                last = json.loads(text[len("data: "):])
            except ValueError:
                pass
        yield chunk


# ---- vector library routes ----------------------------------------------------------------

def _admin_error(raw_request: Request, server: PersonaServer) -> JSONResponse | None:
    if server.admin_key is None:
        return error_response(403, f"the vector admin API is disabled; set {ADMIN_KEY_ENV} to enable it",
                              type_="PermissionDeniedError")
    given = raw_request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not given or not hmac.compare_digest(given, server.admin_key):
        return error_response(401, "a valid admin key is required (Authorization: Bearer <key>)",
                              type_="AuthenticationError")
    return None


async def list_vectors(raw_request: Request) -> JSONResponse:
    library = _state(raw_request).library
    library.refresh()
    data = [VectorInfo.of(library.get(name)).model_dump() for name in library.names()]
    return JSONResponse({"object": "list", "data": data})


async def add_vector(raw_request: Request, name: str) -> Response:
    """Upload a vector file (the request body is the `.safetensors` file)."""
    server = _state(raw_request)
    if (denied := _admin_error(raw_request, server)) is not None:
        return denied
    if not NAME_PATTERN.match(name):
        return error_response(400, "vector name must be 1-64 letters, digits, '_', '-', '.'", "name")
    library = server.library
    if library.directory is None:
        return error_response(409, "the server has no vector directory (--vectors) to add to", "name")
    if library.get(name) is not None:
        return error_response(409, f"vector {name!r} exists; DELETE it first", "name")
    data = await raw_request.body()
    fd, tmp = tempfile.mkstemp(dir=library.directory, prefix=f".{name}.", suffix=".upload")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            vector = load_vector(tmp, name=name)
            vector.check_fits(library.num_layers, library.hidden_size)
        except VectorFileError as exc:
            return error_response(400, str(exc), "body")
        os.replace(tmp, library.directory / f"{name}.safetensors")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    library.refresh()
    return JSONResponse(VectorInfo.of(library.get(name)).model_dump(), status_code=201)


async def delete_vector(raw_request: Request, name: str) -> Response:
    server = _state(raw_request)
    if (denied := _admin_error(raw_request, server)) is not None:
        return denied
    library = server.library
    if library.get(name) is None or library.directory is None:
        return error_response(404, f"no vector named {name!r}", "name", type_="NotFoundError")
    Path(library.directory, f"{name}.safetensors").unlink()
    library.refresh()
    return JSONResponse({"deleted": name})


class PersonaEndpoints:
    """The endpoint plugin object vLLM instantiates."""

    name = "personavec"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.serve.utils.api_utils import validate_json_request
        from fastapi import Depends

        originals = {
            route.path: route.endpoint
            for route in app.routes
            if getattr(route, "methods", None) and "POST" in route.methods
        }
        for path, model in (("/v1/chat/completions", ChatCompletionRequest), ("/v1/completions", CompletionRequest)):
            if path not in originals:
                raise RuntimeError(f"personavec: vLLM no longer serves POST {path}; supports vllm 0.32.*")
            app.add_api_route(path, completion_route(originals[path], model), methods=["POST"],
                              dependencies=[Depends(validate_json_request)])
        app.add_api_route("/v1/persona/vectors", list_vectors, methods=["GET"])
        app.add_api_route("/v1/persona/vectors/{name}", add_vector, methods=["POST"], status_code=201)
        app.add_api_route("/v1/persona/vectors/{name}", delete_vector, methods=["DELETE"])

    async def init_state(self, engine_client, state, args) -> None:
        if engine_client is None:
            return
        from personavec_vllm.steering.frontend import projection_sink

        library = engine_client.input_processor.personavec_library
        names = getattr(args, "served_model_name", None) or [args.model]
        state.personavec = PersonaServer(library, names[0] if isinstance(names, list) else names, projection_sink())
