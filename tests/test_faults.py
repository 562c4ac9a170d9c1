"""Faults injected into a real `personavec serve` (tiny Llama): the engine core killed with
requests in flight. Clients must get an answer at once (an error, or a stream that ends), never
wait out a timeout, and the server must exit promptly instead of lingering."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time
import urllib.error
import urllib.request

import pytest
from engine_fixtures import make_vectors

from personavec_vllm.testing import build_tiny_model, free_port, server_process

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"
# Answers must come well before the 60 s that monitored requests used to wait for projections.
PROMPT_ANSWER_S = 20.0
SERVER_EXIT_S = 45.0


def _request(url: str, payload: dict, stream: bool):
    """(when the client had its whole answer, HTTP status, what it got)."""
    req = urllib.request.Request(
        url, data=json.dumps({**payload, "stream": stream}).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            if stream:
                got = [line.decode().strip() for line in resp if line.startswith(b"data: ")]
            else:
                got = json.loads(resp.read())
            status = resp.status
    except urllib.error.HTTPError as err:
        status, got = err.code, err.read().decode(errors="replace")
    except (ConnectionError, urllib.error.URLError, OSError) as err:
        status, got = None, repr(err)
    return time.monotonic(), status, got


def test_engine_killed_with_requests_in_flight(tmp_path):
    model = str(build_tiny_model("llama", tmp_path / "llama"))
    (tmp_path / "vectors").mkdir()
    make_vectors(tmp_path / "vectors", num_layers=4, hidden=128)
    args = [
        "--model",
        model,
        "--vectors",
        str(tmp_path / "vectors"),
        "--served-model-name",
        MODEL,
        "--enforce-eager",
        "--max-model-len",
        "1024",
    ]
    with server_process(args, port=free_port(), log_path=tmp_path / "server.log", env=dict(os.environ)) as server:
        engine = server.find("EngineCore")
        assert engine, "no EngineCore process in the server's group"
        url = server.url + "/v1/completions"
        base = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True, "temperature": 0}
        monitored = {**base, "persona_monitor": {"vectors": ["a", "b"]}, "persona_steer": [{"vector": "c", "coeff": 1}]}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [
                pool.submit(_request, url, payload, stream)
                for payload in (monitored, base)
                for stream in (True, False)
                for _ in range(2)
            ]
            time.sleep(3.0)  # every request is generating
            assert not any(f.done() for f in futures)
            killed = time.monotonic()
            os.kill(engine[0], signal.SIGKILL)
            results = [f.result() for f in futures]
        for _, status, got in results:
            assert status != 200 or (isinstance(got, list) and got and got[-1] == "data: [DONE]"), got
            assert not (
                isinstance(got, dict)
                and "error" not in got
                and got.get("choices")
                and got["choices"][0].get("finish_reason") == "length"
            ), got
        waited = max(r[0] for r in results) - killed
        assert waited < PROMPT_ANSWER_S, (waited, results)
        deadline = killed + SERVER_EXIT_S
        while server.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        exited_after = time.monotonic() - killed
        assert server.proc.poll() is not None, f"server still running {exited_after:.0f} s after its engine died"
        print(f"clients answered within {waited:.1f} s; server exited {exited_after:.1f} s after the kill")
