"""Fuzzing the persona fields: the spec parser (fast, Hypothesis) and a real server (slow:
Hypothesis-generated bodies, then Schemathesis over the OpenAPI schema of our routes).

The properties: the parser either returns a spec that is valid in every respect the worker
relies on, or raises `PersonaSpecError` naming a field; the server answers every body with 2xx or
4xx (never 5xx, never a hang) and keeps serving."""

from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.request

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import persona_fields, persona_monitor, persona_steer

from personavec_vllm.library import VectorLibrary
from personavec_vllm.server.api import take_persona_fields
from personavec_vllm.spec import REJECT_REASONS, Limits, PersonaSpec, PersonaSpecError, parse_spec
from personavec_vllm.vectors import PersonaVector

L, H = 4, 16
NAMES = ["evil", "kind"]
LIMITS = Limits(max_abs_coeff=10, max_vectors=3)


def _library():
    library = VectorLibrary(None, L, H)
    gen = torch.Generator().manual_seed(0)
    plain = json.dumps({"plain": {str(layer): {"mean": 0.5, "std": 2.0} for layer in range(1, L + 1)}})
    for name in NAMES:  # one with plain-reply statistics (thresholds in sd units), one without
        extra = {"stats": plain} if name == NAMES[0] else {}
        library.add(PersonaVector(name, torch.randn(L + 1, H, generator=gen), name, "m", 2, extra=extra))
    return library


LIBRARY = _library()


def _check_valid(spec: PersonaSpec) -> None:
    assert len(spec.steer) <= LIMITS.max_vectors
    for term in spec.steer:
        assert term.vector in NAMES and math.isfinite(term.coeff) and abs(term.coeff) <= LIMITS.max_abs_coeff
        assert term.layers and all(1 <= x <= L for x in term.layers) and term.positions in ("all", "prompt", "response")
        assert term.op in ("add", "ablate", "cap") and (term.op == "add" or term.coeff == 0.0)
        bounds = [b for b in (term.low, term.high) if b is not None]
        assert all(math.isfinite(b) for b in bounds) and (len(bounds) < 2 or term.low <= term.high)
        assert term.op != "cap" or bounds
        if term.when is not None:
            assert term.when.vector in NAMES and 1 <= term.when.layer <= L and math.isfinite(term.when.threshold)
    for term in spec.monitor:
        assert term.vector in NAMES and all(1 <= x <= L for x in term.layers)
    assert dict(spec.versions) == {n: LIBRARY.version(n) for n in dict(spec.versions)}
    assert PersonaSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steer=persona_steer(NAMES, L), monitor=persona_monitor(NAMES, L))
def test_parser_accepts_valid_specs_or_names_the_field(steer, monitor):
    try:
        spec = parse_spec(steer, monitor, LIBRARY, LIMITS)
    except PersonaSpecError as exc:
        assert exc.reason in REJECT_REASONS
        assert exc.field.split(".")[0].split("[")[0] in ("persona_steer", "persona_monitor")
        assert str(exc).startswith(exc.field) and len(str(exc)) < 400
        return
    _check_valid(spec)


@settings(max_examples=800, deadline=None)
@given(
    fields=persona_fields(NAMES, L),
    n=st.one_of(st.none(), st.integers(0, 3)),
    prompt=st.one_of(st.text(max_size=5), st.lists(st.text(max_size=3), max_size=3)),
    beam=st.booleans(),
)
def test_request_bodies_are_taken_or_refused_by_field(fields, n, prompt, beam):
    body = {"model": "m", "prompt": prompt, "n": n, "use_beam_search": beam, **fields}
    try:
        persona = take_persona_fields(body, LIBRARY, LIMITS)
    except PersonaSpecError as exc:
        assert exc.reason in REJECT_REASONS and exc.field
        return
    assert not any(k.lower().startswith("persona") for k in body)  # nothing persona reaches vLLM
    if persona is not None:
        _check_valid(persona.spec)


# ---- against a real server ---------------------------------------------------------------

MODEL = "tiny-llama"
SERVER_NAMES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from engine_fixtures import make_vectors

    from personavec_vllm.testing import build_tiny_model, free_port, run_server

    root = tmp_path_factory.mktemp("fuzz")
    model = str(build_tiny_model("llama", root / "llama"))
    (root / "vectors").mkdir()
    make_vectors(root / "vectors", num_layers=4, hidden=128)
    env = {**os.environ, "PERSONAVEC_ADMIN_KEY": "fuzz-key", "PERSONAVEC_MAX_COEFF": "10"}
    args = [
        "--model",
        model,
        "--vectors",
        str(root / "vectors"),
        "--served-model-name",
        MODEL,
        "--enforce-eager",
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "8",
    ]
    with run_server(args, port=free_port(), log_path=root / "server.log", env=env) as url:
        yield url


def _post(url, payload):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            raw = resp.read().decode()
            return resp.status, raw if raw.startswith("data:") else json.loads(raw)
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


FUZZED = {"hypothesis": 0}


@pytest.mark.slow
@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(fields=persona_fields(SERVER_NAMES, 4), chat=st.booleans(), stream=st.booleans())
def test_server_answers_every_persona_body_with_2xx_or_4xx(server, fields, chat, stream):
    route = "/v1/chat/completions" if chat else "/v1/completions"
    base = {"model": MODEL, "max_tokens": 2, "temperature": 0, "stream": stream}
    base.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})
    status, body = _post(server + route, {**base, **fields})
    FUZZED["hypothesis"] += 1
    assert status < 500, (fields, body)
    if stream and status == 200:
        assert body.rstrip().endswith("data: [DONE]") and '"code": 5' not in body, (fields, body)
    if status == 200 and not stream and (fields.get("persona_steer") or fields.get("persona_monitor")):
        assert "persona" in body and "error" not in body["persona"], (fields, body)


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(server, tmp_path):
    """A bounded Schemathesis run over the OpenAPI schema of the persona routes and the vector
    routes (their request bodies include the persona fields)."""
    import subprocess
    import sys

    report = tmp_path / "junit.xml"
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        server + "/openapi.json",
        "--include-path-regex",
        "^/v1/(chat/completions|completions|persona/.*)$",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "30",
        "--workers",
        "1",
        "--max-time",
        "150",
        "--header",
        "Authorization: Bearer fuzz-key",
        "--request-timeout",
        "60",
        "--report",
        "junit",
        "--report-junit-path",
        str(report),
        "--seed",
        "1",
        "--suppress-health-check",
        "all",
        "--phases",
        "examples,coverage,fuzzing",
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=1200, cwd=tmp_path
    )  # its cache stays out of the repo
    tail = out.stdout[-6000:] + out.stderr[-2000:]
    assert out.returncode == 0, tail
    assert "passed" in out.stdout.lower() or "no issues" in out.stdout.lower(), tail
    # Still serving. (With the admin key, the fuzzer may have deleted or uploaded vectors.)
    status, body = _post(server + "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert status == 200, body
    with urllib.request.urlopen(server + "/v1/persona/vectors", timeout=30) as resp:
        names = [v["name"] for v in json.loads(resp.read())["data"]]
    if names:
        status, body = _post(
            server + "/v1/completions",
            {"model": MODEL, "prompt": "hi", "max_tokens": 2, "persona_monitor": {"vectors": names[:1]}},
        )
        assert status == 200 and body["persona"]["projections"][names[0]], body
    print(out.stdout[-1500:])
