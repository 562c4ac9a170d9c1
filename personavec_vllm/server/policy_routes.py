"""The policy routes: `GET /v1/persona/policy` (the policy in force, public: steering applied to
everyone is disclosed) and `PUT /v1/persona/policy` (admin key; the body is the new policy, YAML
or JSON). SIGHUP re-reads the `--policy` file. A new policy takes effect only once it validated.

With several API server processes (`--api-server-count N`) each process holds its own copy of
the policy, and a PUT or a signal would reach one of them: there, PUT is refused (409) and each
process re-reads the `--policy` file when it changes (`policy_in_force`), so that one edit of the
file reaches them all within a second."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from personavec_vllm.server.library_routes import admin_error, read_upload
from personavec_vllm.server.policy import Policy, PolicyError
from personavec_vllm.server.state import PersonaServer, error_response, server_state

logger = logging.getLogger(__name__)


def policy_in_force(server: PersonaServer) -> Policy:
    """The policy for the next request; with several API server processes, the `--policy` file
    is re-read first if it changed."""
    if server.api_processes > 1 and server.policy.file_changed():
        _change(server, lambda: server.policy.reload_file(who="file change"))
    return server.policy.current


async def get_policy(raw_request: Request) -> JSONResponse:
    server = server_state(raw_request)
    policy = policy_in_force(server)
    return JSONResponse({"policy": policy.summary(), "history": server.policy.history})


async def put_policy(raw_request: Request) -> Response:
    server = server_state(raw_request)
    if (denied := admin_error(raw_request, server)) is not None:
        return denied
    if server.api_processes > 1:
        return error_response(
            409,
            f"this server runs {server.api_processes} API server processes and a PUT reaches one of them; "
            "change the policy by editing the --policy file, which every process re-reads within a second"
            + ("" if server.policy.path else " (this server was started without --policy)"),
            type_="ConflictError",
        )
    data = await read_upload(raw_request, server.max_upload)
    if isinstance(data, JSONResponse):
        return data
    who = f"PUT /v1/persona/policy from {raw_request.client.host if raw_request.client else 'unknown'}"
    return _change(server, lambda: server.policy.load(data.decode("utf-8", errors="replace"), who=who, source="PUT"))


def reload_on_signal(server: PersonaServer) -> None:
    """SIGHUP: re-read the policy file; a bad file is logged and the policy in force stays."""
    _change(server, lambda: server.policy.reload_file(who="SIGHUP"))


def _change(server: PersonaServer, load) -> Response:  # type: ignore[no-untyped-def]
    try:
        policy = load()
    except PolicyError as exc:
        server.metrics.policy_rejected()
        logger.error("personavec: policy change refused, version %d stays: %s", server.policy.current.version, exc)
        return error_response(400, str(exc), exc.path or "body")
    except OSError as exc:
        server.metrics.policy_rejected()
        logger.error("personavec: policy file unreadable, version %d stays: %s", server.policy.current.version, exc)
        return error_response(400, f"cannot read the policy file: {exc}")
    server.metrics.policy_changed(policy.version)
    return JSONResponse({"policy": policy.summary()})
