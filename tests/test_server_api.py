"""The HTTP surface on a real `personavec serve` subprocess (tiny Llama, loopback): persona
fields through the `openai` client, streaming, 400s naming the field, vector routes, metrics."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest
from engine_fixtures import get_engine, make_vectors, shutdown_engine

from personavec_vllm.engine.offline import persona_params, projections
from personavec_vllm.testing import build_tiny_model, free_port, run_server

pytestmark = pytest.mark.slow

ADMIN_KEY = "test-admin-key"
MODEL_NAME = "tiny-llama"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    model = str(build_tiny_model("llama", root / "llama"))
    vectors_dir = root / "vectors"
    vectors_dir.mkdir()
    vectors = make_vectors(vectors_dir, num_layers=4, hidden=128)
    return model, vectors_dir, vectors, root


@pytest.fixture(scope="module")
def server(setup):
    model, vectors_dir, _, root = setup
    env = {**os.environ, "PERSONAVEC_ADMIN_KEY": ADMIN_KEY, "PERSONAVEC_MAX_COEFF": "10", "PERSONAVEC_MAX_VECTORS": "3"}
    args = [
        "--model",
        model,
        "--vectors",
        str(vectors_dir),
        "--served-model-name",
        MODEL_NAME,
        "--enforce-eager",
        "--max-model-len",
        "1024",
    ]
    with run_server(args, port=free_port(), log_path=root / "server.log", env=env) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def _post(url, payload, headers=None, data=None):
    body = data if data is not None else json.dumps(payload).encode()
    req = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _request(url, method, headers=None, data=None):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


STEER = [
    {"vector": "a", "coeff": 3.0, "layers": [2], "positions": "response"},
    {"vector": "b", "coeff": -2.0, "layers": [1, 3], "positions": "all"},
]
MONITOR = {"vectors": ["a", "c"], "layers": [2, 3], "per_token": True}
PROMPT = "The quick brown fox jumps over the lazy dog because"


def _metrics(server) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("personavec"):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


@pytest.fixture(scope="module")
def engine_reference(setup):
    """The engine-level result for STEER/MONITOR (offline API, same weights), computed before
    the server starts so that only one engine runs at a time."""
    from vllm import SamplingParams

    model, vectors_dir, _, _ = setup
    llm = get_engine(model, str(vectors_dir), eager=True)
    params = persona_params(SamplingParams(max_tokens=8, temperature=0), steer=STEER, monitor=MONITOR)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0]
    result = out.outputs[0].text, projections(out)
    shutdown_engine()
    return result


def test_openai_client_matches_engine(engine_reference, server, client):
    """The same spec through HTTP (openai client, extra_body) and through the engine API gives
    the same text and projections; steering really changes the output."""
    completion = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        extra_body={"persona_steer": STEER, "persona_monitor": MONITOR},
    )
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0)
    persona = completion.model_extra["persona"]
    # the applied terms, with their op and who asked for them spelled out
    assert persona["steer"] == [{**t, "op": "add", "source": "client"} for t in STEER]
    assert "persona" not in plain.model_extra
    text, proj = engine_reference
    assert completion.choices[0].text == text != plain.choices[0].text
    assert set(persona["projections"]) == {"a", "c"} and set(persona["projections"]["a"]) == {"2", "3"}
    for name, by_layer in persona["projections"].items():
        for layer, values in by_layer.items():
            ref = proj[name][int(layer)]
            assert values["per_token"] == pytest.approx(ref.per_token, rel=1e-4, abs=1e-5)
            assert values["prompt_last"] == pytest.approx(ref.prompt_last, rel=1e-4, abs=1e-5)
            assert values["response_mean"] == pytest.approx(ref.response_mean, rel=1e-4, abs=1e-5)


def test_streaming_returns_the_same_persona_object(client):
    kwargs = dict(
        model=MODEL_NAME,
        max_tokens=8,
        temperature=0,
        messages=[{"role": "user", "content": "Tell me about the sea."}],
        extra_body={"persona_steer": STEER[:1], "persona_monitor": MONITOR},
    )
    full = client.chat.completions.create(**kwargs)
    stream = list(client.chat.completions.create(stream=True, **kwargs))
    persona_chunks = [c for c in stream if (c.model_extra or {}).get("persona")]
    assert len(persona_chunks) == 1 and persona_chunks[0] is stream[-1]
    assert persona_chunks[0].model_extra["persona"] == full.model_extra["persona"]
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == full.choices[0].message.content


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"persona_steer": [{"vector": "nope", "coeff": 1}]}, "persona_steer[0].vector"),
        ({"persona_steer": [{"vector": "a", "coeff": 1, "layers": [5]}]}, "persona_steer[0].layers[0]"),
        ({"persona_steer": [{"vector": "a", "coeff": 11}]}, "persona_steer[0].coeff"),
        ({"persona_steer": [{"vector": "a", "coeff": "NaN"}]}, "persona_steer[0].coeff"),
        ({"persona_steer": [{"vector": "a", "coeff": 1, "positions": "middle"}]}, "persona_steer[0].positions"),
        ({"persona_steer": [{"vector": "a", "coeff": 1}] * 4}, "persona_steer"),
        ({"persona_steer": "a"}, "persona_steer"),
        ({"persona_monitor": {"vectors": ["a"], "layers": ["2"]}}, "persona_monitor.layers[0]"),
        ({"persona_monitor": "yes"}, "persona_monitor"),
        ({"persona_monitor": True, "n": 2}, "n"),
        ({"persona_steering": []}, "persona_steering"),
        ({"persona_steer": [{"vector": "a", "op": "shrink"}]}, "persona_steer[0].op"),
        ({"persona_steer": [{"vector": "a", "op": "ablate", "coeff": 1}]}, "persona_steer[0].coeff"),
        ({"persona_steer": [{"vector": "a", "op": "cap"}]}, "persona_steer[0]"),
        ({"persona_steer": [{"vector": "a", "op": "cap", "max": {"sd": 1}}]}, "persona_steer[0].max"),
        ({"persona_steer": [{"vector": "a", "op": "cap", "min": 2, "max": 1}]}, "persona_steer[0].min"),
        ({"persona_steer": [{"vector": "a", "coeff": 1, "when": {"vector": "b"}}]}, "persona_steer[0].when"),
        (
            {"persona_steer": [{"vector": "a", "coeff": 1, "when": {"vector": "b", "above": "x"}}]},
            "persona_steer[0].when.above",
        ),
    ],
)
def test_bad_input_is_a_400_naming_the_field(server, client, extra, field):
    status, body = _post(server + "/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2, **extra})
    assert status == 400, body
    assert body["error"]["param"] == field and field in body["error"]["message"]
    ok = client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2)  # still serving
    assert ok.choices[0].text is not None


def test_ops_report_their_decisions_and_both_projections(client):
    """A conditional term says whether it fired; projections at a layer the request steers come
    before and after its own terms there (an ablated projection is 0 after)."""
    steer = [
        {"vector": "a", "op": "ablate", "layers": [2], "positions": "all"},
        {"vector": "b", "coeff": 2.0, "layers": [3], "when": {"vector": "c", "layer": 1, "above": -1e6}},
        {"vector": "c", "coeff": 2.0, "layers": [3], "when": {"vector": "c", "layer": 1, "below": -1e6}},
    ]
    reply = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=6,
        temperature=0,
        extra_body={
            "persona_steer": steer,
            "persona_monitor": {"vectors": ["a", "b"], "layers": [2, 4], "per_token": True},
        },
    )
    persona = reply.model_extra["persona"]
    assert [t.get("fired") for t in persona["steer"]] == [None, True, False]
    at2 = persona["projections"]["a"]["2"]
    assert max(abs(v) for v in at2["per_token"]) < 1e-4 and abs(at2["before_steering"]["prompt_last"]) > 1e-3
    assert "before_steering" not in persona["projections"]["a"]["4"]  # no term of its own at layer 4


def test_seeded_request_is_refused_not_fatal_on_cpu(server, client):
    """vLLM 0.32's CPU sampler crashes the engine on a per-request seed: refused with a 400."""
    status, body = _post(
        server + "/v1/completions",
        {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2, "temperature": 0.8, "seed": 3},
    )
    assert status == 400 and "seed" in body["error"]["message"]
    assert client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2, temperature=0.8).choices


def test_non_finite_json_coeff(server):
    raw = b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": 2, "persona_steer": [{"vector": "a", "coeff": Infinity}]}'
    status, body = _post(server + "/v1/completions", None, data=raw)
    assert status == 400 and body["error"]["param"] == "persona_steer[0].coeff"


def test_metrics_move_by_the_expected_counts(server, client):
    before = _metrics(server)
    results = []
    for _ in range(3):
        r = client.completions.create(
            model=MODEL_NAME,
            prompt=PROMPT,
            max_tokens=6,
            temperature=0,
            extra_body={"persona_steer": STEER[:1], "persona_monitor": {"vectors": ["a"], "layers": [2]}},
        )
        results.append(r.model_extra["persona"]["projections"]["a"]["2"])
    _post(
        server + "/v1/completions",
        {"model": MODEL_NAME, "prompt": "x", "persona_steer": [{"vector": "zzz", "coeff": 1}]},
    )
    after = _metrics(server)

    def delta(name, **labels):
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("personavec_steered_requests_total", vector="a", model=MODEL_NAME) == 3
    assert delta("personavec_monitored_requests_total", vector="a", model=MODEL_NAME) == 3
    assert delta("personavec_rejected_requests_total", reason="unknown_vector", model=MODEL_NAME) == 1
    common = dict(vector="a", model=MODEL_NAME, layer="2")
    for kind in ("prompt_last", "response_mean"):
        assert delta("personavec_projection_count", kind=kind, **common) == 3
        signed_sum = delta("personavec_projection_sum_pos_total", kind=kind, **common) - delta(
            "personavec_projection_sum_neg_total", kind=kind, **common
        )
        assert signed_sum == pytest.approx(sum(r[kind] for r in results), rel=1e-5, abs=1e-6)
        bucket_le_1 = ("personavec_projection_bucket", frozenset({**common, "kind": kind, "le": "1.0"}.items()))
        assert after.get(bucket_le_1, 0) - before.get(bucket_le_1, 0) == sum(r[kind] <= 1.0 for r in results)
    # buckets are cumulative and end at +Inf == count
    inf = ("personavec_projection_bucket", frozenset({**common, "kind": "prompt_last", "le": "+Inf"}.items()))
    assert after[inf] == after[("personavec_projection_count", frozenset({**common, "kind": "prompt_last"}.items()))]
    # no label value is ever taken from request text
    assert not any("zzz" in str(labels) for _, labels in after)


def test_vector_routes(server, setup, tmp_path):
    _, vectors_dir, _, _ = setup
    status, listing = _request(server + "/v1/persona/vectors", "GET")
    assert status == 200 and [v["name"] for v in listing["data"]] == ["a", "b", "c"]
    a = listing["data"][0]
    assert a["recommended_layer"] == 2 and a["layers"] == [1, 2, 3, 4] and len(a["norms"]) == 5
    assert a["norms"][1] == pytest.approx(0.5, rel=1e-4)

    make_vectors(tmp_path, num_layers=4, hidden=128, names=("new",), seed=7)
    data = (tmp_path / "new.safetensors").read_bytes()
    status, _ = _request(server + "/v1/persona/vectors/new", "POST", data=data)
    assert status == 401
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    status, body = _request(server + "/v1/persona/vectors/new", "POST", headers=auth, data=data)
    assert status == 201 and body["name"] == "new"
    # the new vector steers right away (the engine picks it up) and the wrong shape is refused
    status, body = _post(
        server + "/v1/completions",
        {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4, "persona_steer": [{"vector": "new", "coeff": 3}]},
    )
    assert status == 200 and body["persona"]["steer"][0]["vector"] == "new"
    (tmp_path / "wrong").mkdir()
    make_vectors(tmp_path / "wrong", num_layers=6, hidden=128, names=("bad",))
    status, body = _request(
        server + "/v1/persona/vectors/bad",
        "POST",
        headers=auth,
        data=(tmp_path / "wrong" / "bad.safetensors").read_bytes(),
    )
    assert status == 400 and "needs [5, 128]" in body["error"]["message"]
    status, _ = _request(server + "/v1/persona/vectors/new", "DELETE", headers=auth)
    assert status == 200 and not (vectors_dir / "new.safetensors").exists()
    status, _ = _request(server + "/v1/persona/vectors/new", "DELETE", headers=auth)
    assert status == 404
