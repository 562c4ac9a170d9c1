"""vLLM endpoint plugin (entry point group `vllm.endpoint_plugins`): persona fields on the
OpenAI routes (`completions`), the vector library routes (`library_routes`), the body guard
(`guard`), metrics (`metrics`), and the OpenAPI schema of what those routes read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel

from personavec_vllm.server.api import PersonaFieldsIn
from personavec_vllm.server.completions import completion_route
from personavec_vllm.server.guard import PersonaFieldGuard
from personavec_vllm.server.library_routes import add_vector, delete_vector, list_vectors
from personavec_vllm.server.policy_routes import get_policy, put_policy, reload_on_signal
from personavec_vllm.server.state import PersonaServer

logger = logging.getLogger(__name__)


def _request_schemas() -> dict[str, tuple[type[BaseModel], type[BaseModel]]]:
    """Per persona route: vLLM's request model, and the documented one (vLLM's plus our fields)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return {
        "/v1/chat/completions": (
            ChatCompletionRequest,
            type("PersonaChatCompletionRequest", (ChatCompletionRequest, PersonaFieldsIn), {}),
        ),
        "/v1/completions": (
            CompletionRequest,
            type("PersonaCompletionRequest", (CompletionRequest, PersonaFieldsIn), {}),
        ),
    }


def _json_body(ref: str) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": ref}}}}}


POLICY_DOC: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"application/yaml": {"schema": {"type": "string"}}}},
    "responses": {
        "200": {"description": "in force"},
        "400": {"description": "invalid; the old policy stays"},
        "401": {"description": "admin key missing or wrong"},
        "403": {"description": "admin API disabled"},
    },
}

VECTOR_UPLOAD_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    "responses": {
        "201": {"description": "installed"},
        "400": {"description": "not a valid vector file"},
        "401": {"description": "admin key missing or wrong"},
        "403": {"description": "admin API disabled"},
        "409": {"description": "exists, or the library is full"},
        "413": {"description": "larger than PERSONAVEC_MAX_UPLOAD_BYTES"},
    },
}


def _install_openapi(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Publish the persona routes' request bodies in the app's OpenAPI schema (our routes read
    the body themselves, so FastAPI cannot see it): schema-driven clients and fuzzers cover them."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
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
            if isinstance(route, APIRoute) and "POST" in route.methods
        }
        models = _request_schemas()
        for path, (vllm_model, documented) in models.items():
            if path not in originals:
                raise RuntimeError(f"personavec: vLLM no longer serves POST {path}; supports vllm 0.32.*")
            app.add_api_route(
                path,
                completion_route(originals[path], vllm_model),
                methods=["POST"],
                dependencies=[Depends(validate_json_request)],
                openapi_extra=_json_body(f"#/components/schemas/{documented.__name__}"),
            )
        app.add_api_route("/v1/persona/vectors", list_vectors, methods=["GET"])
        app.add_api_route(
            "/v1/persona/vectors/{name}", add_vector, methods=["POST"], status_code=201, openapi_extra=VECTOR_UPLOAD_DOC
        )
        app.add_api_route("/v1/persona/vectors/{name}", delete_vector, methods=["DELETE"])
        app.add_api_route("/v1/persona/policy", get_policy, methods=["GET"])
        app.add_api_route("/v1/persona/policy", put_policy, methods=["PUT"], openapi_extra=POLICY_DOC)
        app.add_middleware(PersonaFieldGuard)
        _install_openapi(app, [documented for _, documented in models.values()])

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        if engine_client is None:
            return
        from personavec_vllm.engine import frontend

        frontend.SERVING_HTTP = True  # raw extra_args specs now come from clients: refused
        processor = engine_client.input_processor
        names = getattr(args, "served_model_name", None) or [args.model]
        state.personavec = server = PersonaServer(
            processor.personavec_library,
            names[0] if isinstance(names, list) else names,
            frontend.projection_sink(),
            engine_client,
            # vLLM's serve command passes every API server process the same args; one process: None
            api_processes=getattr(args, "api_server_count", None) or 1,
        )
        policy = server.policy.current
        if processor.personavec_disabled and (policy.steer or policy.monitor):
            # Every request would be refused: better not to start.
            raise RuntimeError(f"personavec: the --policy file steers or monitors, but {processor.personavec_disabled}")
        if server.policy.path:  # SIGHUP re-reads the policy file (in this API server process)
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_on_signal, server)
