"""The two persona routes: `/v1/chat/completions` and `/v1/completions` with persona fields.

A request's path: `completion_route` reads the body (bounded nesting), takes and validates the
persona fields (`api.take_persona_fields`: the spec is resolved once, vector versions pinned),
opens an admission for it (`engine.frontend.ADMISSIONS`) and hands the rest to vLLM's own handler
with only the admission's ticket in `vllm_xargs`. The front-end hook gives the resolved spec to the
engine. When vLLM answers, we wait for the worker's report that it took the request (an error
response if it could not), add the `persona` object (projections from the worker via the sink)
to the JSON response or as a last stream chunk, and record metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from personavec_vllm.config import TICKET_KEY
from personavec_vllm.server.api import PersonaRequest, PolicyBroken, take_persona_fields
from personavec_vllm.server.guard import read_json
from personavec_vllm.server.policy_routes import policy_in_force
from personavec_vllm.server.state import PersonaServer, error_response, server_state
from personavec_vllm.spec import PersonaSpecError

if TYPE_CHECKING:
    from personavec_vllm.engine.frontend import Admission

logger = logging.getLogger(__name__)


Endpoint = Callable[..., Awaitable[Any]]


def completion_route(original: Endpoint, request_model: type[BaseModel]) -> Callable[[Request], Awaitable[Response]]:
    """Our handler for a vLLM completion route (`original` is vLLM's endpoint function)."""
    from personavec_vllm.engine.frontend import ADMISSIONS

    async def endpoint(raw_request: Request) -> Response:
        server = server_state(raw_request)
        body = await read_json(raw_request, server)
        if isinstance(body, JSONResponse):
            return body
        policy = policy_in_force(server)
        try:
            persona = take_persona_fields(
                body, server.library, server.limits, policy, raw_request.headers.get("x-request-id")
            )
        except PersonaSpecError as exc:
            server.metrics.reject(exc.reason)
            return error_response(400, str(exc), exc.field)
        except PolicyBroken as exc:
            logger.error("personavec: %s", exc)
            return error_response(500, str(exc), type_="InternalServerError")
        try:
            request = request_model.model_validate(body)
        except ValidationError as exc:
            from fastapi.exceptions import RequestValidationError

            raise RequestValidationError(exc.errors()) from exc
        except Exception as exc:
            return error_response(400, f"request body is invalid: {exc}")
        if persona is None:
            plain: Response = await original(request, raw_request)
            return plain
        admission = ADMISSIONS.open(persona.spec)
        request.vllm_xargs = {**(getattr(request, "vllm_xargs", None) or {}), TICKET_KEY: admission.ticket}  # type: ignore[attr-defined]
        try:
            response: Response = await original(request, raw_request)
        except BaseException:
            server.close(admission)
            raise
        disclosed = _policy_headers(persona, policy.version)
        if isinstance(response, StreamingResponse):
            server.metrics.observe_request(persona.spec)
            headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
            headers.update(disclosed)
            return StreamingResponse(
                _stream_with_persona(response.body_iterator, persona, admission, server),
                status_code=response.status_code,
                media_type=response.media_type,
                headers=headers,
            )
        try:
            if response.status_code != 200:
                return response
            failure = await server.failure_of(admission.keys)
            if failure is not None:
                return error_response(500, failure, type_="InternalServerError")
            server.metrics.observe_request(persona.spec)
            content = json.loads(bytes(response.body))
            persona_object = await server.persona_json(persona)
            if persona.answer:  # only clients that asked get the object (the policy's terms are in it)
                content["persona"] = persona_object
            headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
            headers.update(disclosed)
            return JSONResponse(content, headers=headers)
        finally:
            server.close(admission)

    return endpoint


def _policy_headers(persona: PersonaRequest, version: int) -> dict[str, str]:
    """Steering by the server's policy is disclosed on every response it applies to."""
    if not persona.policy_terms:
        return {}
    terms = [t.to_dict() for t in persona.spec.steer[: persona.policy_terms]]
    return {
        "X-Persona-Policy-Version": str(version),
        "X-Persona-Policy-Steer": json.dumps(terms, separators=(",", ":")),
    }


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _stream_with_persona(
    chunks: AsyncIterable[str | bytes | memoryview],
    persona: PersonaRequest,
    admission: Admission,
    server: PersonaServer,
) -> AsyncIterator[str | bytes | memoryview]:
    """Pass vLLM's SSE chunks through, holding the first generated one until the worker took the
    request (an error event instead, if it could not); before `[DONE]`, one chunk carrying
    `persona`. The stream always ends with `[DONE]`, whatever goes wrong."""
    last: dict[str, Any] = {}
    checked = False
    try:
        async for chunk in chunks:
            text = chunk if isinstance(chunk, str) else bytes(chunk).decode()
            if text.strip() == "data: [DONE]":
                persona_object = await server.persona_json(persona)  # measured even if nobody asked
                if persona.answer:
                    payload: dict[str, Any] = {k: last[k] for k in ("id", "object", "created", "model") if k in last}
                    payload.update(choices=[], persona=persona_object)
                    yield _sse(payload)
            elif text.startswith("data: {"):
                with contextlib.suppress(ValueError):
                    last = json.loads(text[len("data: ") :])
                if not checked and "choices" in last:
                    checked = True
                    failure = await server.failure_of(admission.keys)
                    if failure is not None:
                        yield _sse(
                            {"error": {"message": failure, "type": "InternalServerError", "param": None, "code": 500}}
                        )
                        yield "data: [DONE]\n\n"
                        return
            yield chunk
    except Exception as exc:
        logger.exception("personavec: stream of %s failed", persona.spec.request_key)
        yield _sse(
            {"error": {"message": f"personavec: {exc}", "type": "InternalServerError", "param": None, "code": 500}}
        )
        yield "data: [DONE]\n\n"
    finally:
        server.close(admission)
        close = getattr(chunks, "aclose", None)  # vLLM's generator: stop it with the response
        if close is not None:
            with contextlib.suppress(Exception):
                await close()
