"""A hostile client and a careless operator against a real `personavec serve` (tiny Llama).

Each test reproduces one way the server used to break (issue #12, items 1-7 and 9): an engine
killed by one request, a vector table that never freed columns, a stale prefix cache after a
vector was replaced, in-flight requests broken by a DELETE, uploads accepted but broken, fields
silently ignored, bad bodies answered with 500, metrics with duplicate series. Every test ends
by checking that the server still serves.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import torch
from engine_fixtures import make_vectors
from safetensors.torch import save as safetensors_bytes

from personavec_vllm.testing import build_tiny_model, free_port, run_server

pytestmark = pytest.mark.slow

ADMIN_KEY = "hardening-admin-key"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
MODEL = "tiny-llama"
L, H = 4, 128
MAX_LIBRARY = 4
MAX_UPLOAD = 4 * 1024 * 1024
PROMPT = "The quick brown fox jumps over the lazy dog because"
# Three full KV blocks and more, so that prefix caching has something to reuse.
LONG_PROMPT = " ".join(["The old lighthouse keeper counted the ships that passed in the night."] * 6)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    model = str(build_tiny_model("llama", root / "llama"))
    vectors_dir = root / "vectors"
    vectors_dir.mkdir()
    make_vectors(vectors_dir, num_layers=L, hidden=H, names=("a", "b", "boom"))
    return model, vectors_dir, root


@pytest.fixture(scope="module")
def server(setup):
    model, vectors_dir, root = setup
    env = {
        **os.environ,
        "PERSONAVEC_ADMIN_KEY": ADMIN_KEY,
        "PERSONAVEC_MAX_LIBRARY": str(MAX_LIBRARY),
        "PERSONAVEC_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
        # fault injection: the worker fails to admit any request that uses vector `boom`
        "PERSONAVEC_FAULT_VECTOR": "boom",
    }
    args = [
        "--model",
        model,
        "--vectors",
        str(vectors_dir),
        "--served-model-name",
        MODEL,
        "--enforce-eager",
        "--max-model-len",
        "1024",
        "--enable-prefix-caching",
    ]
    with run_server(args, port=free_port(), log_path=root / "server.log", env=env) as url:
        yield url


def call(url, method="POST", payload=None, data=None, headers=None, timeout=120):
    """(status, decoded JSON body or text) of one request."""
    body = data if data is not None else (None if payload is None else json.dumps(payload).encode())
    head = {"Content-Type": "application/json"} if payload is not None else {}
    req = urllib.request.Request(url, data=body, method=method, headers={**head, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def completion(server, timeout=120, **fields):
    payload = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, **fields}
    return call(server + "/v1/completions", payload=payload, timeout=timeout)


def chat(server, **fields):
    payload = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 4,
        "temperature": 0,
        **fields,
    }
    return call(server + "/v1/chat/completions", payload=payload)


def assert_serving(server):
    """The engine is alive: plain and steered requests still answer 200."""
    status, body = completion(server)
    assert status == 200, body
    status, body = completion(server, persona_steer=[{"vector": "a", "coeff": 2.0}], persona_monitor={"vectors": ["a"]})
    assert status == 200 and body["persona"]["projections"]["a"], body


def assert_400(status, body, param):
    assert status == 400, body
    assert body["error"]["param"] == param, body
    assert param.split("[")[0].split(".")[-1] in body["error"]["message"], body


def vector_bytes(values: torch.Tensor, **metadata) -> bytes:
    meta = {
        "trait": "t",
        "model": "test",
        "hidden_size": str(values.shape[1]),
        "num_layers": str(values.shape[0] - 1),
        "layer": "2",
        "method": "response_avg_diff",
        "description": "uploaded in a test",
        **metadata,
    }
    return safetensors_bytes({"persona_vector": values.contiguous()}, metadata=meta)


def random_vector(seed: int, norm: float = 0.5) -> torch.Tensor:
    v = torch.randn(L + 1, H, generator=torch.Generator().manual_seed(seed))
    return v / v.norm(dim=1, keepdim=True) * norm


def upload(server, name, data, headers=AUTH):
    return call(f"{server}/v1/persona/vectors/{name}", data=data, headers=headers)


def delete(server, name):
    return call(f"{server}/v1/persona/vectors/{name}", method="DELETE", headers=AUTH)


def library_names(server):
    status, body = call(server + "/v1/persona/vectors", method="GET")
    assert status == 200, body
    return [v["name"] for v in body["data"]]


def stream_lines(server, path, payload, timeout=120):
    """The SSE `data:` lines of a streamed request, in order."""
    req = urllib.request.Request(
        server + path,
        data=json.dumps({**payload, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return [line.decode().strip() for line in resp if line.startswith(b"data: ")]


# ---- 1. internal keys and worker-side failures ------------------------------------------


@pytest.mark.parametrize(
    "key, value",
    [
        ("personavec_resolved", "x"),
        ("personavec_reply_to", "ipc:///tmp/not-a-sink"),
        ("personavec", json.dumps({"persona_monitor": True, "request_key": "someone-elses-key"})),
    ],
)
def test_client_cannot_write_internal_keys(server, key, value):
    """`vllm_xargs` is the engine's extra_args: a client writing our internal keys used to kill
    the engine (`personavec_resolved`) or take over another request's projections."""
    status, body = chat(server, vllm_xargs={key: value})
    assert_400(status, body, f"vllm_xargs.{key}")
    assert_serving(server)


def test_internal_keys_are_refused_on_every_route(server):
    """Routes we do not wrap still go through the front-end hook, which refuses the keys."""
    status, body = call(
        server + "/v1/responses",
        payload={"model": MODEL, "input": "Hello", "max_output_tokens": 4, "vllm_xargs": {"personavec_resolved": "x"}},
    )
    assert status == 400, body
    assert "personavec_resolved" in json.dumps(body)
    assert_serving(server)


def test_worker_failure_fails_only_that_request(server):
    """A request the worker cannot admit (fault injected for vector `boom`) fails alone, with a
    clear error; concurrent requests succeed and the engine keeps stepping."""

    def plain(_):
        return completion(server, max_tokens=16)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        others = [pool.submit(plain, i) for i in range(4)]
        failed = pool.submit(completion, server, persona_steer=[{"vector": "boom", "coeff": 1.0}], max_tokens=16)
        status, body = failed.result()
        assert all(f.result()[0] == 200 for f in others)
    assert status == 500, body
    assert "boom" in body["error"]["message"] and "personavec" in body["error"]["message"]
    lines = stream_lines(
        server,
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 16,
            "persona_monitor": {"vectors": ["boom"]},
        },
    )
    assert lines[-1] == "data: [DONE]"
    assert "error" in json.loads(lines[-2][len("data: ") :]), lines[-2]
    assert_serving(server)


# ---- 2. bounded vector table ------------------------------------------------------------


def test_vector_table_frees_columns(server):
    """Uploading, using and deleting names over and over never fills the worker's table; the
    library itself is capped at PERSONAVEC_MAX_LIBRARY and says so with a 409."""
    assert len(library_names(server)) == 3
    for i in range(2 * MAX_LIBRARY + 1):
        name = f"cycle{i}"
        status, body = upload(server, name, vector_bytes(random_vector(100 + i)))
        assert status == 201, body
        status, body = completion(
            server, persona_steer=[{"vector": name, "coeff": 2.0}], persona_monitor={"vectors": [name, "a"]}
        )
        assert status == 200 and set(body["persona"]["projections"]) == {name, "a"}, body
        if i == 0:  # the library now holds MAX_LIBRARY vectors: one more is refused
            status, body = upload(server, "one-too-many", vector_bytes(random_vector(99)))
            assert status == 409 and str(MAX_LIBRARY) in body["error"]["message"], body
        assert delete(server, name)[0] == 200
    assert "one-too-many" not in library_names(server)
    assert_serving(server)


# ---- 3. prefix cache after replacing a vector --------------------------------------------


def test_replaced_vector_never_reads_the_old_cache(server):
    steer = {"coeff": 8.0, "layers": [1, 2, 3], "positions": "all"}
    first, second = random_vector(1, norm=2.0), random_vector(2, norm=2.0)

    def run(name):
        status, body = completion(server, prompt=LONG_PROMPT, max_tokens=12, persona_steer=[{"vector": name, **steer}])
        assert status == 200, body
        return body["choices"][0]["text"]

    try:
        assert upload(server, "swap", vector_bytes(first))[0] == 201
        old = run("swap")
        assert run("swap") == old  # the prefix cache now holds blocks steered by the first direction
        assert delete(server, "swap")[0] == 200
        assert upload(server, "swap-ref", vector_bytes(second))[0] == 201
        reference = run("swap-ref")  # the second direction on a cold cache
        assert reference != old
        assert delete(server, "swap-ref")[0] == 200
        assert upload(server, "swap", vector_bytes(second))[0] == 201
        assert run("swap") == reference
    finally:
        delete(server, "swap")
        delete(server, "swap-ref")
    assert_serving(server)


# ---- 4. deleting a vector in use ---------------------------------------------------------


def test_delete_with_requests_in_flight(server):
    assert upload(server, "doomed", vector_bytes(random_vector(5)))[0] == 201
    monitor = {"vectors": ["doomed"], "per_token": True}
    payload = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 48,
        "temperature": 0,
        "ignore_eos": True,
        "persona_monitor": monitor,
        "persona_steer": [{"vector": "doomed", "coeff": 1.0}],
    }

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        plain = [pool.submit(call, server + "/v1/completions", "POST", payload) for _ in range(4)]
        streams = [pool.submit(stream_lines, server, "/v1/completions", payload) for _ in range(4)]

        time.sleep(0.5)
        assert delete(server, "doomed")[0] == 200
        for f in plain:
            status, body = f.result()
            assert status == 200, body
            proj = body["persona"]["projections"]["doomed"]
            assert len(next(iter(proj.values()))["per_token"]) == 48
        for f in streams:
            lines = f.result()
            assert lines[-1] == "data: [DONE]"
            persona = json.loads(lines[-2][len("data: ") :])["persona"]
            assert "error" not in persona and persona["projections"]["doomed"], persona
    status, body = completion(server, persona_monitor={"vectors": ["doomed"]})
    assert_400(status, body, "persona_monitor.vectors[0]")
    assert_serving(server)


# ---- 5. uploads --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["overflowing_norm", "bad_stats", "stats_wrong_shape", "huge_header", "not_safetensors", "float16_nan"]
)
def test_broken_uploads_are_refused_and_never_installed(server, setup, case):
    _, vectors_dir, _ = setup
    values = random_vector(3)
    data = {
        "overflowing_norm": lambda: vector_bytes(torch.full((L + 1, H), 1e38)),
        "bad_stats": lambda: vector_bytes(values, stats="{not json"),
        "stats_wrong_shape": lambda: vector_bytes(values, stats=json.dumps({"projection": {"2": {"pos_mean": "x"}}})),
        "huge_header": lambda: vector_bytes(values, padding="x" * (2 * 1024 * 1024)),
        "not_safetensors": lambda: b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}xx",
        "float16_nan": lambda: safetensors_bytes(
            {"persona_vector": torch.full((L + 1, H), float("nan")).half()}, metadata={"trait": "t"}
        ),
    }[case]()
    before = sorted(os.listdir(vectors_dir))
    status, body = upload(server, "broken", data)
    assert status == 400 and body["error"]["param"] == "body", body
    assert sorted(os.listdir(vectors_dir)) == before  # nothing written, not even a temp file
    assert "broken" not in library_names(server)
    status, body = completion(server, persona_monitor={"vectors": ["a", "b"]})
    assert status == 200 and "error" not in body["persona"], body
    assert_serving(server)


def test_upload_size_is_capped_before_reading(server, setup):
    """A body larger than PERSONAVEC_MAX_UPLOAD_BYTES is refused from its Content-Length, before
    it is read; a chunked one as soon as it passes the cap."""
    _, vectors_dir, _ = setup
    before = sorted(os.listdir(vectors_dir))
    parsed = urllib.parse.urlparse(server)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    conn.putrequest("POST", "/v1/persona/vectors/big")
    conn.putheader("Authorization", AUTH["Authorization"])
    conn.putheader("Content-Length", str(200 * 1024 * 1024))
    conn.endheaders()
    conn.send(b"\0" * 65536)  # the rest never comes: the answer must not wait for it
    response = conn.getresponse()
    assert response.status == 413, response.read()
    conn.close()

    def chunks():
        for _ in range(MAX_UPLOAD // 65536 + 8):
            yield b"\0" * 65536

    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    try:
        conn.request("POST", "/v1/persona/vectors/big", body=chunks(), headers=AUTH, encode_chunked=True)
        assert conn.getresponse().status == 413
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed while we were still sending
    conn.close()
    assert sorted(os.listdir(vectors_dir)) == before
    assert_serving(server)


# ---- 6. fields that used to be ignored ---------------------------------------------------


def test_monitoring_a_list_of_prompts_is_refused(server):
    status, body = completion(server, prompt=["one", "two"], persona_monitor=True)
    assert_400(status, body, "prompt")
    status, body = completion(server, prompt=["one", "two"], persona_steer=[{"vector": "a", "coeff": 2.0}])
    assert status == 200 and len(body["choices"]) == 2  # steering each prompt is fine


def test_beam_search_with_steering_is_refused(server):
    status, body = completion(server, use_beam_search=True, n=2, persona_steer=[{"vector": "a", "coeff": 2.0}])
    assert_400(status, body, "use_beam_search")


@pytest.mark.parametrize(
    "path, payload",
    [
        ("/v1/responses", {"input": "Hello", "max_output_tokens": 4}),
        ("/v1/chat/completions/batch", {"messages": [[{"role": "user", "content": "Hi"}]], "max_tokens": 4}),
        ("/tokenize", {"prompt": "Hello"}),
    ],
)
def test_persona_fields_on_other_routes_are_refused(server, path, payload):
    status, body = call(
        server + path, payload={"model": MODEL, **payload, "persona_steer": [{"vector": "a", "coeff": 2.0}]}
    )
    assert_400(status, body, "persona_steer")


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"persona_monitor": 0}, "persona_monitor"),
        ({"persona_monitor": 1}, "persona_monitor"),
        ({"persona_monitor": []}, "persona_monitor"),
        ({"persona_steer": {}}, "persona_steer.vector"),
        ({"Persona_steer": [{"vector": "a", "coeff": 2.0}]}, "Persona_steer"),
        ({"PERSONA_MONITOR": True}, "PERSONA_MONITOR"),
    ],
)
def test_falsy_and_misspelt_fields_are_refused(server, fields, param):
    status, body = completion(server, **fields)
    assert_400(status, body, param)


# ---- 7. bad bodies -----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["persona_steer", "vllm_xargs", "messages"])
def test_deeply_nested_json_is_a_400(server, where):
    deep = "[" * 5000 + "]" * 5000
    hi = '[{"role": "user", "content": "hi"}]'
    fields = {
        "persona_steer": f'"messages": {hi}, "persona_steer": {deep}',
        "vllm_xargs": f'"messages": {hi}, "vllm_xargs": {{"x": {deep}}}',
        "messages": f'"messages": [{{"role": "user", "content": {deep}}}]',
    }[where]
    body = '{"model": "%s", "max_tokens": 2, %s}' % (MODEL, fields)
    status, out = call(
        server + "/v1/chat/completions", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    assert status == 400, out
    assert "nest" in out["error"]["message"], out
    assert_serving(server)


@pytest.mark.parametrize(
    "route, fields",
    [
        # vLLM's own request validator raises AttributeError on this (found by Schemathesis): 500 before
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "structured_outputs": [None, None]}),
        ("/v1/completions", {"prompt": "hi", "structured_outputs": [None, None]}),
    ],
)
def test_a_validator_crash_is_a_400(server, route, fields):
    status, body = call(server + route, payload={"model": MODEL, "max_tokens": 2, **fields})
    assert status == 400, body
    assert_serving(server)


def test_huge_integer_coeff_names_the_field(server):
    raw = (
        '{"model": "%s", "prompt": "hi", "max_tokens": 2, "persona_steer": [{"vector": "a", "coeff": %s}]}'
        % (MODEL, "9" * 400)
    ).encode()
    status, body = call(server + "/v1/completions", data=raw, headers={"Content-Type": "application/json"})
    assert_400(status, body, "persona_steer[0].coeff")


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer clé-non-ascii",  # non-ASCII key: 401, not a 400 with an internal message
        ADMIN_KEY,  # the key without the Bearer scheme
        f"Basic {ADMIN_KEY}",
        f"Bearer {ADMIN_KEY}x",
        "Bearer",
    ],
)
def test_admin_key_must_be_a_bearer_token(server, authorization):
    status, body = upload(
        server,
        "sneaky",
        vector_bytes(random_vector(9)),
        headers={"Authorization": authorization.encode("utf-8").decode("latin-1")},
    )
    assert status == 401, body
    assert "sneaky" not in library_names(server)


@pytest.mark.parametrize("name", ["abc%0A", "abc%0D", "%2E%2E", ".hidden", "a%2Fb", "x" * 65])
def test_vector_names_are_strict(server, setup, name):
    _, vectors_dir, _ = setup
    status, body = upload(server, name, vector_bytes(random_vector(9)))
    assert status in (400, 404), body
    assert not any(n.startswith(("abc", "x" * 10)) for n in os.listdir(vectors_dir))


# ---- 9. metrics --------------------------------------------------------------------------


def _exposition(server) -> str:
    with urllib.request.urlopen(server + "/metrics", timeout=30) as resp:
        return resp.read().decode()


def _persona_samples(text):
    from prometheus_client.parser import text_string_to_metric_families

    return [
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in text_string_to_metric_families(text)
        if family.name.startswith("personavec")
        for s in family.samples
    ]


def test_replaced_and_deleted_vectors_keep_metrics_valid(server):
    def stats(shift):
        per_layer = {
            str(layer): {"pos_mean": 1.0 + shift, "pos_std": 0.5, "neg_mean": -1.0 - shift, "neg_std": 0.5}
            for layer in range(1, L + 1)
        }
        return json.dumps({"projection": per_layer})

    for shift in (0.0, 5.0):
        assert upload(server, "metered", vector_bytes(random_vector(11), stats=stats(shift)))[0] == 201
        status, body = completion(
            server, persona_monitor={"vectors": ["metered"]}, persona_steer=[{"vector": "metered", "coeff": 1.0}]
        )
        assert status == 200, body
        samples = _persona_samples(_exposition(server))
        keys = [(name, labels) for name, labels, _ in samples]
        assert len(keys) == len(set(keys)), "duplicate series in the exposition"
        assert any(dict(labels).get("vector") == "metered" for _, labels in keys)
        assert delete(server, "metered")[0] == 200
    assert not any(dict(labels).get("vector") == "metered" for _, labels, _ in _persona_samples(_exposition(server)))
    assert_serving(server)
