"""The package as users install it: a wheel built from the repository, installed alone into a
fresh environment, run from outside the checkout. It must carry its data (the shipped traits and
the default model's vectors), run every command, and serve the default vectors.

The fresh environment borrows the third-party packages of this one (vLLM, torch, ...) through a
`.pth` line, which does not run this environment's editable install of personavec: only the
wheel's copy of the package is importable there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import pytest

from personavec_vllm.testing import free_port, server_process

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SHIPPED_TRAITS = {"evil", "hallucinating", "humorous", "impolite", "sycophantic"}


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob("personavec_vllm-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    work = root / "elsewhere"  # not the checkout
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PERSONAVEC_VECTORS")}
    return {"python": str(python), "bin": venv / "bin", "site": site, "cwd": work, "env": env}


def _run(wheel_env, *args, timeout=300):
    return subprocess.run(
        [str(wheel_env["bin"] / "personavec"), *args],
        capture_output=True,
        text=True,
        cwd=wheel_env["cwd"],
        env=wheel_env["env"],
        timeout=timeout,
    )


def test_the_package_comes_from_the_wheel(wheel_env):
    out = subprocess.run(
        [wheel_env["python"], "-c", "import personavec_vllm; print(personavec_vllm.__file__)"],
        capture_output=True,
        text=True,
        cwd=wheel_env["cwd"],
        env=wheel_env["env"],
        check=True,
    )
    assert out.stdout.strip().startswith(str(wheel_env["site"])), out.stdout


def test_version_without_torch(wheel_env):
    out = subprocess.run(
        [wheel_env["python"], "-X", "importtime", "-m", "personavec_vllm.cli", "--version"],
        capture_output=True,
        text=True,
        cwd=wheel_env["cwd"],
        env=wheel_env["env"],
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.startswith("personavec "), out.stdout + out.stderr
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "vllm" not in imported


def test_trait_list_shows_the_shipped_traits(wheel_env):
    out = _run(wheel_env, "trait", "list")
    assert out.returncode == 0, out.stdout + out.stderr
    listed = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    assert listed == SHIPPED_TRAITS and str(wheel_env["site"]) in out.stderr


def test_bench_help_runs(wheel_env):
    out = _run(wheel_env, "bench", "--help")
    assert out.returncode == 0 and "--concurrency" in out.stdout, out.stdout + out.stderr


def test_serve_uses_the_packaged_vectors(wheel_env, default_model):
    out = _run(wheel_env, "serve", "--dry-run")
    assert out.returncode == 0, out.stdout + out.stderr
    vectors = next(line.split("=", 1)[1] for line in out.stdout.splitlines() if line.startswith("PERSONAVEC_VECTORS="))
    assert vectors.startswith(str(wheel_env["site"])) and vectors.endswith("SmolLM2-135M-Instruct")
    with server_process(
        ["--max-num-seqs", "4", "--enforce-eager"],
        port=free_port(),
        log_path=wheel_env["cwd"] / "server.log",
        env=wheel_env["env"],
        python=wheel_env["python"],
        cwd=wheel_env["cwd"],
    ) as server:
        with urllib.request.urlopen(server.url + "/v1/persona/vectors", timeout=60) as resp:
            names = {v["name"] for v in json.loads(resp.read())["data"]}
        assert names == SHIPPED_TRAITS
        body = json.dumps(
            {
                "model": "SmolLM2-135M-Instruct",
                "max_tokens": 4,
                "temperature": 0,
                "messages": [{"role": "user", "content": "Hi"}],
                "persona_monitor": True,
            }
        ).encode()
        req = urllib.request.Request(
            server.url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            persona = json.loads(resp.read())["persona"]
        assert set(persona["projections"]) == SHIPPED_TRAITS and "error" not in persona
