"""Scale-out: tensor parallelism and several API server processes.

- Tensor parallel: each rank holds the full steering tables (vectors are replicated, as the
  hidden states are after each layer's all-reduce) and steers identically; only TP rank 0 sends
  projections (`runner._publisher`), so each request is counted once. On vLLM's CPU backend a
  TP-2 engine needs `VLLM_CPU_OMP_THREADS_BIND` on a one-NUMA-node machine (without it:
  "Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers. Allowed NUMA nodes are
  [0]. Please try to bind threads manually or decrease DP/TP/PP."); "0|1" gives each rank one core.
- `--api-server-count 2`: vLLM starts the engine first, then two API server processes, each
  with its own projection sink; each monitored request names its process's sink
  (`extra_args["personavec_reply_to"]`) and the worker routes its projections there
  (`results.ResultRouter`). Metrics go through vLLM's Prometheus multiprocess mode and /metrics
  merges both processes' `personavec_` series.

`personavec serve` runs vLLM's single-process entry point (`vllm.entrypoints.openai.api_server`),
which ignores `--api-server-count`; the test starts vLLM's `serve` command itself (the `vllm`
console script does not start with vllm-cpu: its `--version` looks up distribution "vllm").
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from personavec_vllm.engine.transport import Message, ProjectionSink, ResultRouter
from personavec_vllm.testing import build_tiny_model, free_port, http_json, run_server

MODEL = "tiny-llama"
STEER = [{"vector": "a", "coeff": 3.0, "layers": [2], "positions": "response"}]
MONITOR = {"vectors": ["a", "c"], "layers": [2, 3]}
PROMPT = "The quick brown fox jumps over the lazy dog because"

# vLLM's `serve` command (several API server processes) without the `vllm` console script. The
# __main__ guard matters: the API server processes are spawned and re-import this file.
LAUNCHER = """
def main():
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    cli_env_setup()
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    args = make_arg_parser(FlexibleArgumentParser()).parse_args()
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    ServeSubcommand.cmd(args)


if __name__ == "__main__":
    main()
"""


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


@contextlib.contextmanager
def multi_api_server(root: Path, model: str, vectors: Path, count: int):
    from personavec_vllm.cli.serve import build_serve_command

    launcher = root / "vllm_serve.py"
    launcher.write_text(LAUNCHER)
    port = free_port()
    argv, env = build_serve_command(
        model,
        str(vectors),
        [
            "--served-model-name",
            MODEL,
            "--enforce-eager",
            "--max-model-len",
            "1024",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--api-server-count",
            str(count),
        ],
    )
    i = argv.index("-m")
    argv = argv[:i] + [str(launcher)] + argv[i + 2 :]
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    env["PROMETHEUS_MULTIPROC_DIR"] = str(root / "prometheus_multiproc")  # to see each process's files
    (root / "prometheus_multiproc").mkdir()
    log_path = root / "multi_api.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 400
        while True:
            assert proc.poll() is None, log_path.read_text(errors="replace")[-6000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=3) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-6000:]
            time.sleep(1)
        yield url, root / "prometheus_multiproc"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


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


@pytest.mark.slow
def test_two_api_server_processes(setup, reference):
    root, model, vectors = setup
    text, ref = reference
    with multi_api_server(root, model, vectors, count=2) as (url, multiproc_dir):
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
        if len(per_process) < 2:  # both processes accept on one shared socket: the kernel decides
            pytest.skip(
                f"all {sent} connections went to one API server process {per_process}; "
                "every reply was correct, but the other process was never exercised"
            )
        assert sum(per_process.values()) == sent
        metrics = _metrics(url)  # merged over both processes
    _check_counts(metrics, sent)
    common = dict(vector="a", model=MODEL, layer="2", kind="response_mean")
    signed = (
        metrics[("personavec_projection_sum_pos_total", frozenset(common.items()))]
        - metrics[("personavec_projection_sum_neg_total", frozenset(common.items()))]
    )
    assert signed == pytest.approx(sent * ref["projections"]["a"]["2"]["response_mean"], rel=1e-3, abs=1e-3)
