"""vLLM endpoint plugin (entry point group `vllm.endpoint_plugins`): persona fields on the
OpenAI routes, the vector library routes, and metrics.

A request's path: `completion_route` reads the body (bounded nesting), takes and validates the
persona fields (`api.take_persona_fields`: the spec is resolved once, vector versions pinned),
opens an admission for it (`frontend.ADMISSIONS`) and hands the rest to vLLM's own handler with
only the admission's ticket in `vllm_xargs`. The front-end hook gives the resolved spec to the
engine. When vLLM answers, we wait for the worker's report that it took the request (an error
response if it could not), add the `persona` object (projections from the worker via the sink)
to the JSON response or as a last stream chunk, and record metrics.

Every other POST route refuses persona fields (`PersonaFieldGuard`) rather than ignore them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from personavec_vllm.server.api import PersonaFieldsIn, PersonaRequest, VectorInfo, take_persona_fields
from personavec_vllm.server.metrics import PersonaMetrics
from personavec_vllm.spec import Limits, PersonaSpecError
from personavec_vllm.steering.results import EngineGone, PersonaRequestFailed
from personavec_vllm.vectors import LibraryChange, LibraryFull, VectorFileError, is_valid_name

logger = logging.getLogger(__name__)

ADMIN_KEY_ENV = "PERSONAVEC_ADMIN_KEY"
MAX_UPLOAD_ENV = "PERSONAVEC_MAX_UPLOAD_BYTES"
DEFAULT_MAX_UPLOAD = 16 * 1024 * 1024
MAX_JSON_DEPTH_ENV = "PERSONAVEC_MAX_JSON_DEPTH"
DEFAULT_MAX_JSON_DEPTH = 64
COLLECT_TIMEOUT_S = 60.0
PERSONA_ROUTES = ("/v1/chat/completions", "/v1/completions")


def error_response(status: int, message: str, param: str | None = None, type_: str = "BadRequestError") -> JSONResponse:
    """OpenAI-style error body, as vLLM returns its own."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}}, status_code=status)


class PersonaServer:
    """Per-app state: the vector library the engine uses, limits, metrics, the projection sink,
    and the engine client (to abort requests the worker failed, and to notice its death)."""

    def __init__(self, library, model_name: str, sink, engine_client=None):
        self.library = library
        self.limits = Limits.from_env()
        self.metrics = PersonaMetrics(model_name)
        self.sink = sink
        self.engine_client = engine_client
        self.admin_key = os.environ.get(ADMIN_KEY_ENV) or None
        self.max_upload = int(os.environ.get(MAX_UPLOAD_ENV, DEFAULT_MAX_UPLOAD))
        self.max_json_depth = int(os.environ.get(MAX_JSON_DEPTH_ENV, DEFAULT_MAX_JSON_DEPTH))
        self.loop = asyncio.get_running_loop()
        library.listeners.append(self._library_changed)
        sink.on_failure = self._worker_failed

    def _library_changed(self, change: LibraryChange) -> None:
        for name in (*change.changed, *change.removed):
            self.metrics.forget_vector(name)

    def _worker_failed(self, key: str, engine_request_id: str, reason: str) -> None:
        """Sink thread: the worker could not serve a request; abort it in the engine."""
        if self.engine_client is None:
            return

        def abort() -> None:
            self.loop.create_task(self.engine_client.abort(engine_request_id, internal=True))

        with contextlib.suppress(RuntimeError):  # the loop has closed: the server is stopping
            self.loop.call_soon_threadsafe(abort)

    def alive(self) -> bool:
        return self.engine_client is None or not self.engine_client.errored

    async def failure_of(self, keys: list[str]) -> str | None:
        """None once the worker took every engine request of an admission; else why not."""
        for key in keys:
            try:
                await self.sink.await_admission(key, timeout=COLLECT_TIMEOUT_S, alive=self.alive)
            except (PersonaRequestFailed, EngineGone, TimeoutError) as exc:
                self.metrics.fail()
                return str(exc)
        return None

    async def persona_json(self, persona: PersonaRequest) -> dict:
        """The response's `persona` object; on any trouble with projections, the object says so
        in `error` (the generated text itself is fine)."""
        projections = None
        error = None
        if persona.monitors:
            try:
                projections = await self.sink.acollect(persona.spec.request_key, timeout=COLLECT_TIMEOUT_S,
                                                       alive=self.alive)
                self.metrics.observe_projections(projections, persona.spec, self.library.version)
            except Exception as exc:  # noqa: BLE001 - never lose the response over its projections
                logger.error("personavec: projections of %s: %s", persona.spec.request_key, exc)
                error = str(exc)
        out = persona.response_object(projections).to_json()
        if error is not None:
            out["error"] = error
        return out

    def close(self, admission) -> None:
        from personavec_vllm.steering.frontend import ADMISSIONS

        ADMISSIONS.close(admission)
        for key in admission.keys:
            self.sink.discard(key)


def _state(request: Request) -> PersonaServer:
    return request.app.state.personavec


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


async def _read_json(raw_request: Request, server: PersonaServer) -> dict[str, Any] | JSONResponse:
    try:
        body = parse_json_body(await raw_request.body(), server.max_json_depth)
    except ValueError as exc:
        return error_response(400, str(exc))
    if not isinstance(body, dict):
        return error_response(400, "request body must be a JSON object")
    return body


def completion_route(original, request_model):
    """Our handler for a vLLM completion route (`original` is vLLM's endpoint function)."""
    from personavec_vllm.steering.frontend import ADMISSIONS, TICKET_KEY

    async def endpoint(raw_request: Request):
        server = _state(raw_request)
        body = await _read_json(raw_request, server)
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
        except Exception as exc:  # noqa: BLE001 - a validator that crashed on odd input (vLLM's own)
            return error_response(400, f"request body is invalid: {exc}")
        if persona is None:
            return await original(request, raw_request)
        admission = ADMISSIONS.open(persona.spec)
        request.vllm_xargs = {**(request.vllm_xargs or {}), TICKET_KEY: admission.ticket}
        try:
            response = await original(request, raw_request)
        except BaseException:
            server.close(admission)
            raise
        if isinstance(response, StreamingResponse):
            server.metrics.observe_request(persona.spec)
            headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
            return StreamingResponse(_stream_with_persona(response.body_iterator, persona, admission, server),
                                     status_code=response.status_code, media_type=response.media_type,
                                     headers=headers)
        try:
            if response.status_code != 200:
                return response
            failure = await server.failure_of(admission.keys)
            if failure is not None:
                return error_response(500, failure, type_="InternalServerError")
            server.metrics.observe_request(persona.spec)
            content = json.loads(response.body)
            content["persona"] = await server.persona_json(persona)
            headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
            return JSONResponse(content, headers=headers)
        finally:
            server.close(admission)

    return endpoint


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _stream_with_persona(chunks, persona: PersonaRequest, admission, server: PersonaServer):
    """Pass vLLM's SSE chunks through, holding the first generated one until the worker took the
    request (an error event instead, if it could not); before `[DONE]`, one chunk carrying
    `persona`. The stream always ends with `[DONE]`, whatever goes wrong."""
    last: dict[str, Any] = {}
    checked = False
    try:
        async for chunk in chunks:
            text = chunk.decode() if isinstance(chunk, bytes) else chunk
            if text.strip() == "data: [DONE]":
                payload = {k: last[k] for k in ("id", "object", "created", "model") if k in last}
                payload.update(choices=[], persona=await server.persona_json(persona))
                yield _sse(payload)
            elif text.startswith("data: {"):
                with contextlib.suppress(ValueError):
                    last = json.loads(text[len("data: "):])
                if not checked and "choices" in last:
                    checked = True
                    failure = await server.failure_of(admission.keys)
                    if failure is not None:
                        yield _sse({"error": {"message": failure, "type": "InternalServerError", "param": None,
                                              "code": 500}})
                        yield "data: [DONE]\n\n"
                        return
            yield chunk
    except Exception as exc:  # noqa: BLE001 - end the stream properly, with the reason
        logger.exception("personavec: stream of %s failed", persona.spec.request_key)
        yield _sse({"error": {"message": f"personavec: {exc}", "type": "InternalServerError", "param": None,
                              "code": 500}})
        yield "data: [DONE]\n\n"
    finally:
        server.close(admission)
        with contextlib.suppress(Exception):
            await chunks.aclose()


class PersonaFieldGuard:
    """ASGI middleware: a POST to any route other than the two persona routes that carries a
    top-level `persona*` field gets a 400 naming it, instead of vLLM silently dropping it.
    Bodies are scanned only when they contain the text "persona", so other traffic pays a
    substring search."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or scope.get("method") != "POST" or path in PERSONA_ROUTES \
                or path.startswith("/v1/persona/"):
            return await self.app(scope, receive, send)
        messages, body = [], b""
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
                400, f"{field}: persona fields are supported on {' and '.join(PERSONA_ROUTES)} only", field)
            return await response(scope, receive, send)

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    @staticmethod
    def _persona_field(body: bytes) -> str | None:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            return None  # not JSON: the route answers for itself
        if not isinstance(data, dict):
            return None
        return next((k[:64] for k in data if k.lower().startswith("persona")), None)


# ---- vector library routes ----------------------------------------------------------------

def _admin_error(raw_request: Request, server: PersonaServer) -> JSONResponse | None:
    """403 when the admin API is off; 401 unless `Authorization: Bearer <the admin key>`."""
    if server.admin_key is None:
        return error_response(403, f"the vector admin API is disabled; set {ADMIN_KEY_ENV} to enable it",
                              type_="PermissionDeniedError")
    scheme, _, token = raw_request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    # Header values arrive as latin-1 text; compare bytes, so any byte sequence is just "wrong".
    given = token.encode("latin-1", errors="replace")
    if scheme.lower() != "bearer" or not token or not hmac.compare_digest(given, server.admin_key.encode()):
        return error_response(401, "a valid admin key is required (Authorization: Bearer <key>)",
                              type_="AuthenticationError")
    return None


async def _read_upload(raw_request: Request, limit: int) -> bytes | JSONResponse:
    """The body, at most `limit` bytes: refused from its Content-Length before reading, or as
    soon as a chunked body passes the limit."""
    too_large = error_response(413, f"a vector file may be at most {limit} bytes ({MAX_UPLOAD_ENV})", "body",
                               type_="RequestEntityTooLarge")
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
    library = _state(raw_request).library
    library.refresh()
    data = []
    for name in library.names():
        vector = library.get(name)
        if vector is not None:
            data.append(VectorInfo.of(vector).model_dump())
    return JSONResponse({"object": "list", "data": data})


async def add_vector(raw_request: Request, name: str) -> Response:
    """Upload a vector file (the request body is the `.safetensors` file)."""
    server = _state(raw_request)
    if (denied := _admin_error(raw_request, server)) is not None:
        return denied
    if not is_valid_name(name):
        return error_response(400, "vector name must be 1-64 letters, digits, '_', '-', '.', starting with a "
                              "letter or digit", "name")
    library = server.library
    if library.directory is None:
        return error_response(409, "the server has no vector directory (--vectors) to add to", "name")
    if library.get(name) is not None:
        return error_response(409, f"vector {name!r} exists; DELETE it first", "name")
    data = await _read_upload(raw_request, server.max_upload)
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
    server = _state(raw_request)
    if (denied := _admin_error(raw_request, server)) is not None:
        return denied
    if not server.library.remove(name):
        return error_response(404, f"no vector named {name[:64]!r}", "name", type_="NotFoundError")
    return JSONResponse({"deleted": name})


# ---- OpenAPI ----------------------------------------------------------------------------

def _request_schemas() -> dict[str, type]:
    """Request models of the two persona routes, as documented: vLLM's own plus our fields."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return {
        "/v1/chat/completions": type("PersonaChatCompletionRequest", (ChatCompletionRequest, PersonaFieldsIn), {}),
        "/v1/completions": type("PersonaCompletionRequest", (CompletionRequest, PersonaFieldsIn), {}),
    }


def _json_body(ref: str) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": ref}}}}}


VECTOR_UPLOAD_DOC = {
    "requestBody": {"required": True, "content": {"application/octet-stream": {
        "schema": {"type": "string", "format": "binary"}}}},
    "responses": {"201": {"description": "installed"}, "400": {"description": "not a valid vector file"},
                  "401": {"description": "admin key missing or wrong"}, "403": {"description": "admin API disabled"},
                  "409": {"description": "exists, or the library is full"},
                  "413": {"description": "larger than PERSONAVEC_MAX_UPLOAD_BYTES"}},
}


def _install_openapi(app: FastAPI, models: dict[str, type]) -> None:
    """Publish the persona routes' request bodies in the app's OpenAPI schema (our routes read
    the body themselves, so FastAPI cannot see it): schema-driven clients and fuzzers cover them."""
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in models.values():
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in model_schema.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components[model.__name__] = model_schema
        schema.setdefault("components", {})["schemas"] = components
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


class PersonaEndpoints:
    """The endpoint plugin object vLLM instantiates."""

    name = "personavec"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        from fastapi import Depends
        from vllm.entrypoints.serve.utils.api_utils import validate_json_request

        originals = {
            route.path: route.endpoint
            for route in app.routes
            if getattr(route, "methods", None) and "POST" in route.methods
        }
        models = _request_schemas()
        for path, model in models.items():
            if path not in originals:
                raise RuntimeError(f"personavec: vLLM no longer serves POST {path}; supports vllm 0.32.*")
            vllm_model = model.__mro__[1]
            app.add_api_route(path, completion_route(originals[path], vllm_model), methods=["POST"],
                              dependencies=[Depends(validate_json_request)],
                              openapi_extra=_json_body(f"#/components/schemas/{model.__name__}"))
        app.add_api_route("/v1/persona/vectors", list_vectors, methods=["GET"])
        app.add_api_route("/v1/persona/vectors/{name}", add_vector, methods=["POST"], status_code=201,
                          openapi_extra=VECTOR_UPLOAD_DOC)
        app.add_api_route("/v1/persona/vectors/{name}", delete_vector, methods=["DELETE"])
        app.add_middleware(PersonaFieldGuard)
        _install_openapi(app, models)

    async def init_state(self, engine_client, state, args) -> None:
        if engine_client is None:
            return
        from personavec_vllm.steering import frontend

        frontend.SERVING_HTTP = True  # raw extra_args specs now come from clients: refused
        library = engine_client.input_processor.personavec_library
        names = getattr(args, "served_model_name", None) or [args.model]
        state.personavec = PersonaServer(library, names[0] if isinstance(names, list) else names,
                                         frontend.projection_sink(), engine_client)
