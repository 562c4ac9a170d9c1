"""The server policy: its file's validation (every error names its path), sampling, and how its
terms merge with a client's (fast); then a real server with a policy (slow): all-traffic
monitoring moves the metrics for plain OpenAI-client requests, steering is disclosed, client
steering can be denied, and hot reloads under load never fail a request."""

from __future__ import annotations

import concurrent.futures
import json
import os
import threading
import urllib.error
import urllib.request

import pytest
import torch

from personavec_vllm.library import VectorLibrary
from personavec_vllm.server.api import take_persona_fields
from personavec_vllm.server.policy import PolicyError, PolicyHolder, parse_policy
from personavec_vllm.spec import Limits, PersonaSpecError
from personavec_vllm.vectors import PersonaVector

L, H = 4, 16


@pytest.fixture
def library():
    lib = VectorLibrary(None, L, H)
    gen = torch.Generator().manual_seed(0)
    for name in ("evil", "kind"):
        stats = json.dumps({"plain": {str(layer): {"mean": 1.0, "std": 0.5} for layer in range(1, L + 1)}})
        lib.add(PersonaVector(name, torch.randn(L + 1, H, generator=gen), name, "m", 2, extra={"stats": stats}))
    return lib


@pytest.mark.parametrize(
    "text, path",
    [
        ("monitor: {vectors: all, sample: 2}", "monitor.sample"),
        ("monitor: {vector: all}", "monitor.vector"),
        ("steer: [{vector: nope, coeff: 1}]", "steer[0].vector"),
        ("steer: [{vector: evil, coeff: 1, layers: [9]}]", "steer[0].layers[0]"),
        ("steer: [{vector: evil, op: cap}]", "steer[0]"),
        ("steer: [{vector: evil, op: cap, max: {sd: 2}, min: {sd: 3}}]", "steer[0].min"),
        ("steer: [{vector: evil, coeff: 1, when: {vector: kind, above: 1, below: 2}}]", "steer[0].when"),
        ("client_steering: maybe", "client_steering"),
        ("limits: {max_coeff: -1}", "limits.max_coeff"),
        ("surprise: 1", "surprise"),
        ("[1, 2]", ""),
        ("steer: [{vector: evil, coeff: 1}", ""),  # not YAML
    ],
)
def test_policy_errors_name_their_path(library, text, path):
    with pytest.raises(PolicyError) as info:
        parse_policy(text, library, 1, "test")
    assert info.value.path == path, str(info.value)


def test_sampling_is_deterministic_and_near_the_rate(library):
    policy = parse_policy("monitor: {vectors: [evil], sample: 0.25}", library, 1, "test")
    decisions = [policy.samples(f"req-{i}") for i in range(4000)]
    assert decisions == [policy.samples(f"req-{i}") for i in range(4000)]  # reproducible
    assert 0.22 < sum(decisions) / len(decisions) < 0.28


def test_policy_terms_merge_with_the_client_and_stay_hidden(library):
    policy = parse_policy(
        "monitor: {vectors: all}\nsteer: [{vector: evil, op: cap, max: {sd: 2}}]\nlimits: {max_coeff: 3}",
        library,
        1,
        "test",
    )
    body = {"model": "m", "prompt": "hi"}
    plain = take_persona_fields(dict(body), library, Limits(), policy, "r1")
    assert plain is not None and not plain.answer  # measured and capped, but nothing to show
    assert [t.op for t in plain.spec.steer] == ["cap"] and plain.spec.steer[0].high == pytest.approx(2.0)
    assert {t.vector for t in plain.spec.monitor} == {"evil", "kind"}
    assert plain.response_object({}).to_json().get("projections") is None
    client = take_persona_fields(
        {**body, "persona_steer": [{"vector": "kind", "coeff": 2}], "persona_monitor": {"vectors": ["kind"]}},
        library,
        Limits(),
        policy,
        "r2",
    )
    assert [(t.vector, t.op) for t in client.spec.steer] == [("evil", "cap"), ("kind", "add")]
    shown = client.response_object({"evil": {}, "kind": {}}).to_json()
    assert [s["source"] for s in shown["steer"]] == ["policy", "client"]
    assert set(shown["projections"]) == {"kind"}  # the policy's own measurements stay hidden
    with pytest.raises(PersonaSpecError, match="exceeds the limit 3"):  # the policy's limits bind clients
        take_persona_fields({**body, "persona_steer": [{"vector": "kind", "coeff": 4}]}, library, Limits(), policy)
    deny = parse_policy("client_steering: deny", library, 2, "test")
    with pytest.raises(PersonaSpecError) as info:
        take_persona_fields({**body, "persona_steer": [{"vector": "kind", "coeff": 1}]}, library, Limits(), deny)
    assert info.value.field == "persona_steer"
    assert take_persona_fields({**body, "persona_monitor": True}, library, Limits(), deny).answer


def test_a_bad_policy_never_replaces_the_good_one(library, tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("steer: [{vector: evil, coeff: -1}]")
    holder = PolicyHolder(library, str(path))
    assert holder.current.version == 1
    path.write_text("steer: [{vector: evil, coeff: oops}]")
    with pytest.raises(PolicyError):
        holder.reload_file()
    assert holder.current.version == 1 and holder.current.steer[0].coeff == -1
    path.write_text("steer: [{vector: kind, coeff: 1}]")
    assert holder.reload_file().version == 2 and holder.current.steer[0].vector == "kind"
    assert [h["by"] for h in holder.history] == ["start-up", "SIGHUP"]


def test_policy_file_changes_are_noticed_once(library, tmp_path):
    """With several API server processes each re-reads the file when it changes
    (`policy_routes.policy_in_force`); a bad file is not retried until it changes again."""
    path = tmp_path / "policy.yaml"
    path.write_text("client_steering: allow")
    holder = PolicyHolder(library, str(path))
    assert not holder.file_changed(interval_s=0)
    path.write_text("client_steering: deny ")  # another size: a change even within one mtime tick
    assert holder.file_changed(interval_s=0)
    assert not holder.file_changed(interval_s=3600)  # checked at most once per interval
    path.write_text("client_steering: maybe")
    with pytest.raises(PolicyError):
        holder.reload_file(who="file change")
    assert not holder.file_changed(interval_s=0) and holder.current.client_steering
    assert PolicyHolder(library).file_changed(interval_s=0) is False  # no --policy: nothing to watch


# ---- a real server with a policy ----------------------------------------------------------

MODEL = "tiny-llama"
ADMIN = "policy-admin"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from engine_fixtures import make_vectors

    from personavec_vllm.testing import build_tiny_model, free_port, server_process

    root = tmp_path_factory.mktemp("policy")
    model = str(build_tiny_model("llama", root / "llama"))
    (root / "vectors").mkdir()
    make_vectors(root / "vectors", num_layers=4, hidden=128)
    policy = root / "policy.yaml"
    policy.write_text("monitor: {vectors: [a, b], layers: [2]}\nsteer: [{vector: c, op: ablate, layers: [3]}]\n")
    env = {**os.environ, "PERSONAVEC_ADMIN_KEY": ADMIN}
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
        "--policy",
        str(policy),
    ]
    with server_process(args, port=free_port(), log_path=root / "server.log", env=env) as server:
        yield server.url, policy, server.proc.pid  # `personavec serve` execs the API server: same pid


def _metrics(url):
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        if f.name.startswith("personavec")
        for s in f.samples
    }


def _put_policy(url, text):
    req = urllib.request.Request(
        url + "/v1/persona/policy", data=text.encode(), method="PUT", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
def test_plain_openai_traffic_is_monitored_and_the_policy_disclosed(served):
    from openai import OpenAI

    url, _, _ = served
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    count = (
        "personavec_projection_count",
        (("kind", "response_mean"), ("layer", "2"), ("model", MODEL), ("vector", "a")),
    )
    before = _metrics(url).get(count, 0.0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0
    )
    reply = raw.parse()
    assert "persona" not in (reply.model_extra or {})  # it never asked
    assert json.loads(raw.headers["x-persona-policy-steer"]) == [
        {"vector": "c", "op": "ablate", "layers": [3], "positions": "response"}
    ]
    for _ in range(3):
        list(client.completions.create(model=MODEL, prompt="Once", max_tokens=4, stream=True))
    after = _metrics(url)
    assert after[count] - before == 4  # every request measured, streaming included
    assert after[("personavec_policy_version", (("model", MODEL),))] == 1
    asked = client.completions.create(
        model=MODEL, prompt="Once", max_tokens=4, extra_body={"persona_monitor": {"vectors": ["b"], "layers": [2]}}
    )
    persona = asked.model_extra["persona"]
    assert set(persona["projections"]) == {"b"} and persona["steer"][0]["source"] == "policy"


@pytest.mark.slow
def test_hot_reload_under_load_fails_no_request(served):
    url, policy, pid = served

    def one(i):
        body = json.dumps({"model": MODEL, "prompt": f"Item {i}", "max_tokens": 8, "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status

    stop = threading.Event()
    statuses = []

    def load():
        i = 0
        while not stop.is_set():
            statuses.append(one(i))
            i += 1

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(load) for _ in range(4)]
        versions = []
        for i in range(6):
            coeff = 1.0 + i
            status, body = _put_policy(url, f"monitor: {{vectors: all}}\nsteer: [{{vector: a, coeff: {coeff}}}]\n")
            assert status == 200, body
            versions.append(body["policy"]["version"])
        status, body = _put_policy(url, "steer: [{vector: missing, coeff: 1}]")  # refused, the last one stays
        assert status == 400 and body["error"]["param"] == "steer[0].vector"
        stop.set()
        for w in workers:
            w.result()
    assert statuses and set(statuses) == {200}, statuses
    assert versions == sorted(versions) and len(set(versions)) == 6
    with urllib.request.urlopen(url + "/v1/persona/policy", timeout=30) as resp:
        current = json.loads(resp.read())["policy"]
    assert current["version"] == versions[-1] and current["steer"][0]["coeff"] == 6.0
    rejected = _metrics(url)[("personavec_policy_changes_total", (("model", MODEL), ("result", "rejected")))]
    assert rejected >= 1
    # SIGHUP re-reads the file
    policy.write_text("client_steering: deny\n")
    import signal

    os.kill(pid, signal.SIGHUP)

    def denied():
        req = urllib.request.Request(
            url + "/v1/completions",
            data=json.dumps(
                {"model": MODEL, "prompt": "x", "max_tokens": 2, "persona_steer": [{"vector": "a", "coeff": 1}]}
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            urllib.request.urlopen(req, timeout=60)
            return False
        except urllib.error.HTTPError as err:
            return err.code == 400

    import time

    deadline = time.monotonic() + 30
    while not denied():
        assert time.monotonic() < deadline, "SIGHUP did not reload the policy"
        time.sleep(0.5)


@pytest.mark.slow
def test_deleting_a_vector_the_policy_uses_is_refused(served):
    url, _, _ = served
    _put_policy(url, "steer: [{vector: b, coeff: 1}]")
    req = urllib.request.Request(
        url + "/v1/persona/vectors/b", method="DELETE", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == 409
