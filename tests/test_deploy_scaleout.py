"""Scale-out: tensor parallelism and several API server processes.

- Tensor parallel: each rank holds the full steering tables (vectors are replicated, as the
  hidden states are after each layer's all-reduce) and steers identically; only TP rank 0 sends
  projections (`runner._publisher`), so each request is counted once. On vLLM's CPU backend a
  TP-2 engine needs `VLLM_CPU_OMP_THREADS_BIND` on a one-NUMA-node machine (without it:
  "Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers. Allowed NUMA nodes are
  [0]. Please try to bind threads manually or decrease DP/TP/PP."); "0|1" gives each rank one core.
- `--api-server-count 2 --data-parallel-size 2`: `personavec serve` runs vLLM's own `serve`
  command (`engine.serve_entry`): two engine cores (DP ranks, each one core here), then two API
  server processes, each with its own projection sink; each monitored request names its
  process's sink (`extra_args["personavec_reply_to"]`) and the worker of whichever engine took it
  routes its projections there (`results.ResultRouter`). Metrics go through vLLM's Prometheus
  multiprocess mode and /metrics merges both processes' `personavec_` series. Each process holds
  its own copy of the policy: PUT is refused and every process re-reads the `--policy` file.
- Pipeline parallelism is refused for persona requests (`test_plain_vllm`); vLLM 0.32's CPU
  backend fails plain requests under `--pipeline-parallel-size 2` too ("assert
  self.intermediate_tensors is not None" in the second stage), so no server test runs it.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from personavec_vllm.engine.transport import Message, ProjectionSink, ResultRouter
from personavec_vllm.testing import build_tiny_model, free_port, http_json, run_server, server_process

MODEL = "tiny-llama"
STEER = [{"vector": "a", "coeff": 3.0, "layers": [2], "positions": "response"}]
MONITOR = {"vectors": ["a", "c"], "layers": [2, 3]}
PROMPT = "The quick brown fox jumps over the lazy dog because"

# ---- routing (fast) ----------------------------------------------------------------------------


def _wait(sink: ProjectionSink, key: str, timeout: float = 10.0):
    return sink.collect(key, timeout=timeout)


def test_router_sends_each_request_to_its_front_end():
    one, two = ProjectionSink(), ProjectionSink()
    router = ResultRouter()
    for sink, key in ((one, "r1"), (two, "r2")):
        sink.expect(key, [("a", 2)])
    router.route("r1", one.address)
    router.route("r2", two.address)
    router.route("r3", None)  # no address named: nobody waits, nothing is sent
    router.send(
        Message(
            values=[("r1", 0, {("a", 2): [1.0, 2.0]}), ("r2", 0, {("a", 2): [5.0, 7.0]}), ("r3", 0, {("a", 2): [3.0]})]
        )
    )
    router.send(Message(done=["r1", "r2", "r3"]))
    assert _wait(one, "r1")["a"][2].per_token == [1.0, 2.0]
    assert _wait(two, "r2")["a"][2].response_mean == 7.0
    assert router._routes == {}  # forgotten once done
    # a sink never sees another front end's requests
    assert one._pending == {} and two._pending == {}


def test_router_without_any_address_drops_quietly():
    router = ResultRouter()
    router.send(Message(values=[("x", 0, {("a", 2): [1.0]})], done=["x"]))


# ---- real servers (slow) -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from engine_fixtures import make_vectors

    root = tmp_path_factory.mktemp("scaleout")
    model = str(build_tiny_model("llama", root / "llama"))
    vectors = root / "vectors"
    vectors.mkdir()
    make_vectors(vectors, num_layers=4, hidden=128)
    return root, model, vectors


def _complete(url: str, prompt: str = PROMPT, **extra) -> dict:
    return http_json(
        url + "/v1/completions",
        {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": 8,
            "temperature": 0,
            "persona_steer": STEER,
            "persona_monitor": MONITOR,
            **extra,
        },
    )


def _metrics(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        if f.name.startswith("personavec")
        for s in f.samples
    }


def _check_counts(metrics: dict, n: int) -> None:
    common = dict(vector="a", model=MODEL, layer="2")
    assert metrics[("personavec_monitored_requests_total", frozenset(dict(vector="a", model=MODEL).items()))] == n
    assert metrics[("personavec_steered_requests_total", frozenset(dict(vector="a", model=MODEL).items()))] == n
    for kind in ("prompt_last", "response_mean"):
        labels = {**common, "kind": kind}
        assert metrics[("personavec_projection_count", frozenset(labels.items()))] == n
        assert metrics[("personavec_projection_bucket", frozenset({**labels, "le": "+Inf"}.items()))] == n


@pytest.fixture(scope="module")
def reference(setup):
    """Text and persona object of PROMPT on one ordinary server (TP 1, one API process)."""
    root, model, vectors = setup
    args = [
        "--model",
        model,
        "--vectors",
        str(vectors),
        "--served-model-name",
        MODEL,
        "--enforce-eager",
        "--max-model-len",
        "1024",
    ]
    with run_server(args, port=free_port(), log_path=root / "reference.log") as url:
        reply = _complete(url)
    return reply["choices"][0]["text"], reply["persona"]


def _assert_same_persona(persona: dict, ref: dict) -> None:
    assert "error" not in persona, persona
    assert persona["steer"] == ref["steer"]
    assert set(persona["projections"]) == set(ref["projections"]) == {"a", "c"}
    for name, by_layer in ref["projections"].items():
        for layer, values in by_layer.items():
            got = persona["projections"][name][layer]
            for kind in ("prompt_last", "response_mean"):
                assert got[kind] == pytest.approx(values[kind], rel=1e-3, abs=1e-4), (name, layer, kind)


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a TP-2 CPU engine binds one core per rank: needs 2 cores")
def test_tensor_parallel_2_on_cpu(setup, reference):
    root, model, vectors = setup
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    args = [
        "--model",
        model,
        "--vectors",
        str(vectors),
        "--served-model-name",
        MODEL,
        "--enforce-eager",
        "--max-model-len",
        "1024",
        "--tensor-parallel-size",
        "2",
    ]
    with run_server(args, port=free_port(), log_path=root / "tp2.log", env=env, startup_timeout=400) as url:
        replies = [_complete(url) for _ in range(3)]
        metrics = _metrics(url)
    log = (root / "tp2.log").read_text(errors="replace")
    assert "Worker_TP0" in log and "Worker_TP1" in log
    text, ref = reference
    for reply in replies:  # steered the same as on one rank: same text, same projections
        assert reply["choices"][0]["text"] == text
        _assert_same_persona(reply["persona"], ref)
    _check_counts(metrics, 3)  # rank 0 alone reports: nothing counted twice


def _monitored_per_process(directory: Path) -> dict[str, float]:
    """Requests monitoring vector `a` per API server process, from the multiprocess files."""
    from prometheus_client.mmap_dict import MmapedDict

    out = {}
    for path in directory.glob("counter_*.db"):
        total = 0.0
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            metric, _, labels, *_ = json.loads(key)
            if metric == "personavec_monitored_requests" and labels.get("vector") == "a":
                total += value
        if total:
            out[path.stem.removeprefix("counter_")] = total
    return out


def _engine_requests(url: str) -> dict[str, float]:
    """Finished requests per engine core (vLLM's own metric, label `engine`)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vllm:request_success_total":
                out[sample.labels["engine"]] = out.get(sample.labels["engine"], 0.0) + sample.value
    return out


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two CPU engine cores bind one core each: needs 2 cores")
def test_two_api_servers_and_two_engines(setup, reference):
    root, model, vectors = setup
    text, ref = reference
    policy = root / "policy.yaml"
    policy.write_text("client_steering: allow\n")
    multiproc_dir = root / "prometheus_multiproc"  # set here to read each process's own files
    multiproc_dir.mkdir()
    env = {
        **os.environ,
        "VLLM_CPU_OMP_THREADS_BIND": "0|1",
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir),
        "PERSONAVEC_ADMIN_KEY": "k",
    }
    args = [
        "--model",
        model,
        "--vectors",
        str(vectors),
        "--policy",
        str(policy),
        "--served-model-name",
        MODEL,
        "--enforce-eager",
        "--max-model-len",
        "1024",
        "--api-server-count",
        "2",
        "--data-parallel-size",
        "2",
    ]
    log_path = root / "multi_api.log"
    with server_process(args, port=free_port(), log_path=log_path, env=env, startup_timeout=400) as server:
        url = server.url
        sent = 0
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            for _ in range(12):  # until both processes have taken persona requests
                replies = list(pool.map(lambda _: _complete(url), range(16)))
                sent += len(replies)
                for reply in replies:  # every reply has its projections, whichever process took it
                    assert reply["choices"][0]["text"] == text
                    _assert_same_persona(reply["persona"], ref)
                if len(_monitored_per_process(multiproc_dir)) >= 2:
                    break
        per_process = _monitored_per_process(multiproc_dir)
        # both processes accept on one shared socket and the kernel spreads connections: after
        # 16+ connections, the chance that one process took them all is below 1e-4
        assert len(per_process) == 2, per_process
        assert sum(per_process.values()) == sent
        engines = _engine_requests(url)
        assert set(engines) == {"0", "1"} and all(engines.values()), engines  # both DP engines served
        metrics = _metrics(url)  # merged over both processes

        # the policy: PUT would reach one process, so it is refused; a file edit reaches both
        put = urllib.request.Request(
            url + "/v1/persona/policy",
            data=b"client_steering: deny\n",
            method="PUT",
            headers={"Authorization": "Bearer k"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(put, timeout=30)
        assert refused.value.code == 409 and b"--policy file" in refused.value.read()
        policy.write_text("client_steering: deny\n")
        time.sleep(1.5)
        codes = []
        for _ in range(16):
            try:
                _complete(url)
                codes.append(200)
            except urllib.error.HTTPError as exc:
                codes.append(exc.code)
        assert codes == [400] * 16, codes
        assert http_json(url + "/v1/persona/policy")["policy"]["client_steering"] == "deny"
    _check_counts(metrics, sent)
    common = dict(vector="a", model=MODEL, layer="2", kind="response_mean")
    signed = (
        metrics[("personavec_projection_sum_pos_total", frozenset(common.items()))]
        - metrics[("personavec_projection_sum_neg_total", frozenset(common.items()))]
    )
    assert signed == pytest.approx(sent * ref["projections"]["a"]["2"]["response_mean"], rel=1e-3, abs=1e-3)


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a PP-2 CPU engine binds one core per stage: needs 2 cores")
def test_a_monitoring_policy_under_pipeline_parallelism_stops_the_start(setup):
    """Under pipeline parallelism every persona request is refused, so a policy that monitors all
    traffic would refuse every request: the server does not start, and says why."""
    root, model, vectors = setup
    policy = root / "pp_policy.yaml"
    policy.write_text("monitor: {vectors: [a], layers: [2]}\n")
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    args = ["--model", model, "--vectors", str(vectors), "--policy", str(policy), "--served-model-name", MODEL]
    args += ["--enforce-eager", "--max-model-len", "1024", "--pipeline-parallel-size", "2"]
    with (
        pytest.raises(RuntimeError, match="server exited") as failed,
        run_server(args, port=free_port(), log_path=root / "pp.log", env=env, startup_timeout=400),
    ):
        pass
    assert "the --policy file steers or monitors, but persona steering and monitoring are not supported" in str(
        failed.value
    )
