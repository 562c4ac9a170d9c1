"""Per-app state of the persona server, and the OpenAI-style error body."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse

from personavec_vllm import config
from personavec_vllm.engine.transport import EngineGone, PersonaRequestFailed
from personavec_vllm.library import LibraryChange, VectorLibrary
from personavec_vllm.server.api import PersonaRequest
from personavec_vllm.server.metrics import PersonaMetrics
from personavec_vllm.server.policy import PolicyHolder
from personavec_vllm.spec import Limits

if TYPE_CHECKING:
    from personavec_vllm.engine.frontend import Admission
    from personavec_vllm.engine.transport import ProjectionSink

logger = logging.getLogger(__name__)


COLLECT_TIMEOUT_S = 60.0
PERSONA_ROUTES = ("/v1/chat/completions", "/v1/completions")


def error_response(status: int, message: str, param: str | None = None, type_: str = "BadRequestError") -> JSONResponse:
    """OpenAI-style error body, as vLLM returns its own."""
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": status}}, status_code=status
    )


class PersonaServer:
    """Per-app state: the vector library the engine uses, limits, metrics, the projection sink,
    and the engine client (to abort requests the worker failed, and to notice its death)."""

    def __init__(
        self,
        library: VectorLibrary,
        model_name: str,
        sink: ProjectionSink,
        engine_client: Any = None,
        api_processes: int = 1,
    ):
        self.library = library
        # API server processes of this server (`--api-server-count`): each has a PersonaServer.
        self.api_processes = api_processes
        self.limits = Limits.from_env()
        self.metrics = PersonaMetrics(model_name)
        self.sink = sink
        self.engine_client = engine_client
        self.admin_key = config.get(config.ADMIN_KEY)
        self.max_upload = config.get_int(config.MAX_UPLOAD_BYTES)
        self.max_json_depth = config.get_int(config.MAX_JSON_DEPTH)
        self.loop = asyncio.get_running_loop()
        self.policy = PolicyHolder(library, config.get(config.POLICY))
        self.metrics.policy_changed(self.policy.current.version)
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

    async def persona_json(self, persona: PersonaRequest) -> dict[str, Any]:
        """The response's `persona` object; on any trouble with projections, the object says so
        in `error` (the generated text itself is fine)."""
        projections = None
        error = None
        gates = None
        if persona.conditional:
            try:
                gates = await self.sink.gate_decisions(
                    persona.spec.request_key, timeout=COLLECT_TIMEOUT_S, alive=self.alive
                )
                self.metrics.observe_gates(persona.spec, gates)
            except Exception as exc:
                error = str(exc)
        if persona.monitors:
            try:
                projections = await self.sink.acollect(
                    persona.spec.request_key, timeout=COLLECT_TIMEOUT_S, alive=self.alive
                )
                self.metrics.observe_projections(projections, persona.spec, self.library.version)
            except Exception as exc:
                logger.error("personavec: projections of %s: %s", persona.spec.request_key, exc)
                error = str(exc)
        out = persona.response_object(projections, gates).to_json()
        if error is not None:
            out["error"] = error
        return out

    def close(self, admission: Admission) -> None:
        from personavec_vllm.engine.frontend import ADMISSIONS

        ADMISSIONS.close(admission)
        for key in admission.keys:
            self.sink.discard(key)


def server_state(request: Request) -> PersonaServer:
    state: PersonaServer = request.app.state.personavec
    return state
