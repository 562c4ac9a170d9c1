"""Test helpers: tiny random-weight models of the architectures we patch.

The models are small enough to build in a second and to run through vLLM on a CPU, and
they carry the embedded default model's real tokenizer and chat template (vocab 49152),
so prompts, chat requests and detokenization behave as with a real model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personavec_vllm.models import atomic_build, default_model_path

TINY_ARCHS = ("llama", "qwen2", "qwen3", "mistral")
TINY_FORMAT_VERSION = 1

# Files of the default model's folder that make up its tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _tiny_config(
    arch: str,
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    intermediate_size: int,
    vocab_size: int,
    initializer_range: float,
):
    import torch
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        initializer_range=initializer_range,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        dtype=torch.float32,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if arch == "qwen2":
        return Qwen2Config(use_sliding_window=False, sliding_window=None, **common)
    if arch == "qwen3":
        return Qwen3Config(use_sliding_window=False, sliding_window=None, **common)
    raise ValueError(f"unknown tiny arch {arch!r}; choose from {', '.join(TINY_ARCHS)}")


def build_tiny_model(
    arch: str,
    out_dir: str | os.PathLike,
    *,
    num_layers: int = 4,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    intermediate_size: int = 256,
    seed: int = 0,
    initializer_range: float = 0.1,
) -> Path:
    """Build (once) a tiny random float32 model of `arch` at `out_dir`; return the path.

    `arch` is one of "llama", "qwen2", "qwen3", "mistral". Weights come from a fixed
    `seed`; the tokenizer and chat template are copied from `default_model_path()`.
    `head_dim` must be at least 32 (vLLM's CPU attention supports head sizes 32..512).
    `initializer_range` 0.1 (not HF's 0.02) makes greedy outputs depend on the prompt
    instead of repeating one token, and widens logit margins so that HF and vLLM agree.
    A finished folder built with the same arguments is reused; the build is atomic.
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {', '.join(TINY_ARCHS)}")
    if head_dim < 32:
        raise ValueError("head_dim must be >= 32: vLLM's CPU attention needs head sizes 32..512")
    params = dict(
        arch=arch,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        seed=seed,
        initializer_range=initializer_range,
    )
    tokenizer_src = default_model_path()

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        config = _tiny_config(
            arch,
            num_layers=num_layers,
            hidden_size=hidden_size,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            intermediate_size=intermediate_size,
            vocab_size=49152,
            initializer_range=initializer_range,
        )
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(tmp, safe_serialization=True)
        for name in _TOKENIZER_FILES:
            if (tokenizer_src / name).exists():
                shutil.copy2(tokenizer_src / name, tmp / name)

    return atomic_build(
        out_dir,
        build,
        version=TINY_FORMAT_VERSION,
        info={"tiny_model": params},
        what=f"tiny {arch} model",
    )


# ---------------------------------------------------------------------------------------
# Engines and servers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, payload: dict | None = None, timeout: float = 120.0):
    """GET (or POST `payload` as JSON) and decode the JSON answer."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def _tail(path: Path, n: int = 12000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "<no log>"


def process_group_pids(pgid: int) -> list[int]:
    """Every live process of process group `pgid` (vLLM's engine core and workers stay in their
    parent's group)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.getpgid(int(entry)) == pgid:
                    pids.append(int(entry))
    return pids


@dataclass
class ServerProcess:
    """A running `personavec serve`: its base URL and its process (the leader of its group)."""

    url: str
    proc: subprocess.Popen

    def group_pids(self) -> list[int]:
        """Every live process of the server's process group (API server, engine core, workers)."""
        return process_group_pids(self.proc.pid)

    def find(self, title: str) -> list[int]:
        """Pids of the group whose command line (vLLM sets process titles) contains `title`."""
        found = []
        for pid in self.group_pids():
            with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
                if title.encode() in f.read():
                    found.append(pid)
        return found


@contextlib.contextmanager
def run_server(
    args: Sequence[str],
    *,
    port: int,
    log_path: str | os.PathLike,
    env: dict[str, str] | None = None,
    startup_timeout: float = 180.0,
) -> Iterator[str]:
    """Run `personavec serve <args> --host 127.0.0.1 --port <port>` in its own process
    group; yield the base URL once `/health` answers 200; stop the whole group after."""
    with server_process(args, port=port, log_path=log_path, env=env, startup_timeout=startup_timeout) as server:
        yield server.url


@contextlib.contextmanager
def server_process(
    args: Sequence[str],
    *,
    port: int,
    log_path: str | os.PathLike,
    env: dict[str, str] | None = None,
    startup_timeout: float = 180.0,
    python: str | None = None,
    cwd: str | os.PathLike | None = None,
) -> Iterator[ServerProcess]:
    """`run_server`, yielding the `ServerProcess`; `python`: the interpreter to run it with
    (default: this one), `cwd`: the folder to run it in.

    Raises `RuntimeError` with the end of the server log if the server exits or does not
    become healthy within `startup_timeout` seconds.
    """
    log_path = Path(log_path)
    cmd = [
        python or sys.executable,
        "-m",
        "personavec_vllm.cli",
        "serve",
        *args,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=cwd)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with code {proc.returncode} before becoming healthy; "
                    f"log ({log_path}):\n{_tail(log_path)}"
                )
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"server not healthy after {startup_timeout:.0f} s; log ({log_path}):\n{_tail(log_path)}"
                )
            time.sleep(1.0)
        yield ServerProcess(base, proc)
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    # vLLM's engine core and workers share the group; make sure none outlives the server.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
