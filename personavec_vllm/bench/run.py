"""What persona steering and monitoring cost on the real HTTP server, and what the usual
alternative (HF transformers + a forward hook) costs, measured in one run.

    personavec bench                              # or: python -m personavec_vllm.bench
    personavec bench --concurrency 1,8,32,64 --requests 16,64,64,64 --output-len 64

Scenarios (all on the same seeded workload; ratios divide by scenario 1 at the same concurrency):

  1  vLLM without the plugin (VLLM_PLUGINS excluding personavec)       - the baseline
  1b a second such server: how far two identical servers differ
  2  personavec loaded, requests unsteered                            \\
  3  every request steered with the same spec                          | one server start
  4  every request steered with a different spec                       |
  5a/5b  every request monitors 1 / 3 vectors                         /
  6a/6b  HF transformers generate + forward hook: scenario 3's spec (batch = concurrency) and
         scenario 4's specs (one spec per batch, so one request per batch)

Writes `<out>/<prefix>.md`, `.csv`, `_requests.csv` and PNG plots. See benchmarks/README.md in the repository.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any

from personavec_vllm import config
from personavec_vllm.bench.options import SERVED_NAME
from personavec_vllm.bench.setup import (
    CpuMeter,
    Progress,
    load_vectors,
    log,
    machine_description,
    make_vectors,
    persona_check,
    server_check,
)

BENCH_ADMIN_KEY = "personavec-bench-admin"  # scenario 5d changes the server policy

# ---- the run ------------------------------------------------------------------------------


class Bench:
    worker_threads: int | None = None  # read from the server log once the first server started
    kv_tokens = 0  # the KV cache's size in tokens, from the server log
    hf_threads: int  # set when the HF reference runs

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
        from personavec_vllm.bench.scenarios import SCENARIOS

        wanted = args.scenarios or [s.key for s in SCENARIOS]
        self.scenarios = [s.key for s in SCENARIOS if s.key in set(wanted) | {"plain"}]
        self.results: list[Any] = []
        self.checks: list[str] = []
        self.notes: list[str] = []
        self.out = Path(args.out)

    def choose_vectors(self, tmp: Path):
        from transformers import AutoConfig

        from personavec_vllm.data import vectors_dir
        from personavec_vllm.models import DEFAULT_MODEL_NAME, default_model_dir

        a = self.args
        config = AutoConfig.from_pretrained(self.model)
        num_layers, hidden = config.num_hidden_layers, config.hidden_size
        folder = Path(a.vectors) if a.vectors else None
        if folder is None and not a.random_vectors and Path(self.model) == default_model_dir():
            shipped = vectors_dir(DEFAULT_MODEL_NAME)
            if len(list(shipped.glob("*.safetensors"))) >= 3:
                folder = shipped
        if folder is not None:
            import shutil

            for f in sorted(folder.glob("*.safetensors")):  # a snapshot: the run serves what it read
                shutil.copy2(f, tmp / f.name)
            return load_vectors(tmp, num_layers, hidden), f"the vector library {folder} (copied at start)"
        vectors = make_vectors(self.model, tmp, list(self.workload[0].prompt_token_ids), a.vector_norm)
        return vectors, (
            f"{len(vectors.names)} random directions, per layer {a.vector_norm} x the model's "
            "mean residual norm on a workload prompt"
        )

    # servers ----------------------------------------------------------------------------

    def server_args(self, vectors_dir: str) -> list[str]:
        a = self.args
        from personavec_vllm.bench.workload import chat_template_tokens

        template = chat_template_tokens(self.tokenizer) if a.api == "chat" else 0
        max_len = a.prompt_len.max + template + a.output_len.max + 16
        argv = [
            "--model",
            self.model,
            "--served-model-name",
            SERVED_NAME,
            "--vectors",
            vectors_dir,
            "--dtype",
            "float32",
            "--max-model-len",
            str(max_len),
            "--seed",
            "0",
            "--disable-uvicorn-access-log",
        ]
        if a.max_num_seqs:
            argv += ["--max-num-seqs", str(a.max_num_seqs)]
        if a.no_prefix_caching:
            argv.append("--no-enable-prefix-caching")
        if a.enforce_eager:
            argv.append("--enforce-eager")
        return argv + shlex.split(a.vllm_args)

    def server_env(self, plugin: bool, steering_off: bool = False) -> dict[str, str]:
        from personavec_vllm.cli.serve import default_vllm_plugins, plain_vllm_plugins

        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        env.update(self.args.server_env)  # the same for both servers
        if plugin:
            env["VLLM_PLUGINS"] = default_vllm_plugins()
            env["PERSONAVEC_ADMIN_KEY"] = BENCH_ADMIN_KEY  # scenario 5d changes the policy
            env[config.STEERING] = "off" if steering_off else "on"
        else:
            env["VLLM_PLUGINS"] = plain_vllm_plugins()
        return env

    @contextlib.contextmanager
    def server(self, plugin: bool, twin: bool = False, instance: int = 0, steering_off: bool = False):
        """One server (plain vLLM, a second plain vLLM, personavec or personavec with steering
        off), checked; yields its base URL."""
        from personavec_vllm.bench.profile import server_roles
        from personavec_vllm.testing import free_port, server_process

        env = self.server_env(plugin, steering_off)
        which = "plugin_steering_off" if steering_off else "plugin" if plugin else "plain_twin" if twin else "plain"
        log_dir = self.out if self.args.keep_logs else Path(self.tmp)
        start = f"_start{instance + 1}" if self.args.instances > 1 else ""
        log_path = log_dir / f"{self.args.prefix}_server_{which}{start}.log"
        log(
            f"starting the {'personavec' if plugin else 'plain vLLM'} server (VLLM_PLUGINS={env['VLLM_PLUGINS']}; "
            f"{'eager' if self.args.enforce_eager else 'compiled'} mode, log {log_path}) ..."
        )
        t = time.monotonic()
        try:
            with server_process(
                self.server_args(self.vectors.directory),
                port=free_port(),
                log_path=log_path,
                env=env,
                startup_timeout=self.args.startup_timeout,
            ) as proc:
                base = proc.url
                self.roles[base] = server_roles(proc.group_pids(), proc.proc.pid)
                log(f"server ready after {time.monotonic() - t:.0f} s")
                self.notes.append(f"{which} server start: {time.monotonic() - t:.0f} s (not measured)")
                self.record_threads(log_path, which)
                self.sanity_checks(base, "off" if steering_off else "on" if plugin else "plain")
                yield base
        except Exception:
            if not self.args.keep_logs and log_path.exists():
                kept = self.out / log_path.name
                kept.write_bytes(log_path.read_bytes())
                log(f"server log kept in {kept}")
            raise

    def run_server_scenarios(self, keys: list[str]) -> None:
        """Both servers (and those of scenarios 1b and 2n) run side by side, only one of
        them loaded at a time. Each pass measures every scenario once per level, in an order
        rotated by pass and level, so that slow drift of the machine and order effects spread over
        all scenarios instead of biasing one server. With --instances N the servers are started
        afresh N times (pass indices run on), because a server keeps what its start gave it (where
        its memory lies, how its allocator settled) for all its passes."""
        from personavec_vllm.bench.scenarios import OWN_SERVER, STEERING_OFF, TWIN

        plugin_keys = [k for k in keys if k not in OWN_SERVER]
        order = [k for k in keys if k in OWN_SERVER] + plugin_keys
        for instance in range(self.args.instances):
            if self.args.instances > 1:
                log(f"server instance {instance + 1} of {self.args.instances}: starting fresh servers")
            with contextlib.ExitStack() as stack:
                bases = {"plain": stack.enter_context(self.server(False, instance=instance))}
                if TWIN in keys:
                    bases[TWIN] = stack.enter_context(self.server(False, twin=True, instance=instance))
                if STEERING_OFF in keys:
                    off = self.server(True, instance=instance, steering_off=True)
                    bases[STEERING_OFF] = stack.enter_context(off)
                if plugin_keys:
                    plugin_base = stack.enter_context(self.server(True, instance=instance))
                    bases |= dict.fromkeys(plugin_keys, plugin_base)
                for key in OWN_SERVER:
                    if key in bases:
                        self.warm_up(bases[key], [key], False)
                if plugin_keys:
                    self.warm_up(plugin_base, plugin_keys, True)
                for p in range(instance * self.args.passes, (instance + 1) * self.args.passes):
                    log(f"pass {p + 1} of {self.args.passes * self.args.instances}")
                    for li, c in enumerate(self.levels):
                        shift = (p + li) % len(order)
                        for key in order[shift:] + order[:shift]:
                            self.measure_level(bases[key], key, c, p, instance=instance)
                if self.args.profile and instance == self.args.instances - 1:
                    log("profiled pass (py-spy on every server process; not in the ratios)")
                    after = self.args.passes * self.args.instances
                    for c in self.levels:
                        for key in order:
                            self.measure_level(bases[key], key, c, after, profile=True, instance=instance)

    def record_threads(self, log_path: Path, which: str) -> None:
        """Note the KV cache's size and the cores vLLM bound its CPU worker's threads to."""
        from personavec_vllm.bench.setup import server_log_facts

        self.kv_tokens, self.worker_threads, note = server_log_facts(
            log_path, which, self.kv_tokens, self.worker_threads
        )
        if note:
            self.notes.append(note)

    def sanity_checks(self, base: str, server: str) -> None:
        """Before timing: persona fields must be ignored by the plain server, refused by ours with
        steering off and applied by ours."""
        check = server_check(base, server, self.workload[0], self.vectors, self.check_texts)
        if check not in self.checks:
            self.checks.append(check)

    def warm_up(self, base: str, keys: list[str], plugin: bool) -> None:
        """Untimed, so that no measurement pays for a server's first times: (1) as many requests
        as the largest concurrency, all at once and long enough that every decode batch size up to
        it runs, with every scenario's specs among them (the first use of each vector loads it into
        the engine's tables); (2) prompts that together fill the KV cache once (the first write to
        each of its pages is a page fault, which the first measurement would pay for otherwise)."""
        import math
        from dataclasses import replace

        from personavec_vllm.bench.client import run_level
        from personavec_vllm.bench.scenarios import persona_fields
        from personavec_vllm.bench.workload import BenchRequest, with_fresh_words

        c = max(self.levels)
        words = self.words_for(-1, -1, c)
        count = max(c, 16, len(self.vectors.names))
        reqs = [replace(words[i % len(words)], index=i, output_len=8) for i in range(count)]
        names = self.vectors.names

        def extra_of(i: int) -> dict:
            if plugin and i < len(names):  # the first use of every vector
                return {"persona_steer": [{"vector": names[i], "coeff": 1.0}]}
            return persona_fields(keys[i % len(keys)], i, self.vectors)

        log(f"warm-up (untimed): {len(reqs)} requests at concurrency {c}")
        run_level(base, SERVED_NAME, "warmup", c, reqs, extra_of, lambda p, i: None, **self.protocol)
        if self.kv_tokens:
            longest = self.args.prompt_len.max
            shapes = [BenchRequest(i, (0,) * longest, 1) for i in range(math.ceil(self.kv_tokens / longest) + 1)]
            fill = with_fresh_words(shapes, self.vocab, self.args.seed + 7, lambda ids: str(self.tokenizer.decode(ids)))
            log(
                f"warm-up (untimed): {len(fill)} prompts of {longest} tokens, the KV cache ({self.kv_tokens} tokens) once"
            )
            run_level(base, SERVED_NAME, "warmup", c, fill, lambda i: {}, lambda p, i: None, **self.protocol)

    @property
    def protocol(self) -> dict:
        return {"api": self.args.api, "stream": self.args.stream}

    def words_for(self, pass_index: int, scenario_index: int, concurrency: int) -> list:
        """The workload with words of its own for one measurement (same shapes everywhere), so
        that with prefix caching on no measurement reuses another's prefill. Every level of a
        pass has its own words too: a server that ran c=32 and then, after other servers' turns,
        c=64 with the same prompts found them in its prefix cache (plain vLLM at 149 instead of
        ~90 tok/s, 15,872 prompt tokens cached)."""
        from personavec_vllm.bench.workload import with_fresh_words

        seed = f"{self.args.seed}/pass {pass_index}/scenario {scenario_index}/c {concurrency}"
        return with_fresh_words(self.workload, self.vocab, seed, lambda ids: str(self.tokenizer.decode(ids)))

    def measure_level(
        self, base: str, key: str, c: int, pass_index: int, profile: bool = False, instance: int = 0
    ) -> None:
        from personavec_vllm.bench.scenarios import policy_document
        from personavec_vllm.bench.setup import put_policy

        if key != "policy_monitor3":
            self._measure_level(base, key, c, pass_index, profile, instance)
            return
        put_policy(base, policy_document(self.vectors), BENCH_ADMIN_KEY)
        try:
            self._measure_level(base, key, c, pass_index, profile, instance)
        finally:
            put_policy(base, "", BENCH_ADMIN_KEY)

    def _measure_level(self, base: str, key: str, c: int, pass_index: int, profile: bool, instance: int) -> None:
        from personavec_vllm.bench.client import run_level
        from personavec_vllm.bench.profile import EngineWork, ProcessUsage, ProfiledLevel, sampling, summarize_stacks
        from personavec_vllm.bench.scenarios import SCENARIOS, label, persona_fields
        from personavec_vllm.bench.stats import summarize

        number = [s.key for s in SCENARIOS].index(key)
        reqs = self.words_for(pass_index, number, c)[: self.per_level[c]]
        bar = Progress(len(reqs), f"{label(key)} c={c} pass {pass_index + 1}", not self.args.no_progress)
        roles = self.roles[base]
        stacks_dir = self.out / f"{self.args.prefix}_profile"
        meter = CpuMeter()
        with contextlib.ExitStack() as stack:
            stack.callback(bar.close)
            files = stack.enter_context(sampling(roles, stacks_dir, f"{key}_c{c}")) if profile else {}
            usage = stack.enter_context(ProcessUsage.measure(roles))
            work = stack.enter_context(EngineWork.measure(base))
            t0 = time.perf_counter()
            res = run_level(
                base,
                SERVED_NAME,
                key,
                c,
                reqs,
                lambda i: persona_fields(key, i, self.vectors),
                persona_check(key, self.vectors),
                bar,
                pass_index=pass_index,
                **self.protocol,
            )
            wall = time.perf_counter() - t0
        s = summarize(res)
        s.other_cpu = meter.stop()
        if profile:
            stacks = {role: summarize_stacks(path) for role, path in files.items()}
            self.profiled.append(ProfiledLevel(key, c, s.output_tokens, wall, usage.seconds, stacks))
            log(
                f"{label(key):<28} c={c:<3} profiled: "
                + ", ".join(f"{role} {100 * st.ours_share:.2f} % ours of {st.samples}" for role, st in stacks.items())
            )
            return
        s.instance = instance
        s.server_cpu_s = sum(usage.seconds.values())
        s.worker_cpu_s = usage.seconds.get("worker", math.nan)
        s.worker_minor_faults = usage.minor_faults.get("worker", math.nan)
        s.worker_huge_mb = usage.huge_mb.get("worker", math.nan)
        s.prompt_tokens_computed, s.preemptions, s.engine_steps = (
            work.prompt_tokens_computed,
            work.preemptions,
            work.steps,
        )
        self.measured[(key, c, pass_index)] = s
        self.results.extend(res)
        errs = f", {s.errors} ERRORS (first: {next(r.error for r in res if r.error)})" if s.errors else ""
        log(
            f"{label(key):<28} c={c:<3} pass {pass_index + 1} {s.tok_per_s:8.1f} tok/s  latency p50 "
            f"{s.latency_p50:6.2f} s  p99 {s.latency_p99:6.2f} s  TTFT p50 {s.ttft_p50:6.2f} s  "
            f"other CPU {s.other_cpu:4.2f} cores{errs}"
        )

    # HF reference -------------------------------------------------------------------------

    def run_hf(self, keys: list[str]) -> None:
        from personavec_vllm.bench.hf_run import run_hf

        run_hf(self, keys)

    # ----------------------------------------------------------------------------------------

    def run(self) -> int:
        from transformers import AutoTokenizer

        from personavec_vllm.bench.profile import profile_table
        from personavec_vllm.bench.report import Report, write_report
        from personavec_vllm.bench.scenarios import HF_SCENARIOS
        from personavec_vllm.bench.stats import summarize_all
        from personavec_vllm.bench.workload import WorkloadConfig, make_workload, word_vocab
        from personavec_vllm.models import resolve_model

        t_start = time.monotonic()
        a = self.args
        self.out.mkdir(parents=True, exist_ok=True)
        machine = machine_description()
        self.model = str(resolve_model(a.model))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model)
        cfg = WorkloadConfig(seed=a.seed, prompt_len=a.prompt_len, output_len=a.output_len)
        self.vocab = word_vocab(self.tokenizer)
        self.workload = make_workload(cfg, max(self.per_level.values()), self.vocab)
        self.check_texts: dict[str, str] = {}
        self.worker_threads = None
        self.measured: dict = {}  # (scenario, c, pass) -> its LevelStats with CPU use and vLLM's counters
        self.roles: dict[str, dict[str, int]] = {}  # base URL -> {role: pid}
        self.profiled: list = []  # bench.profile.ProfiledLevel of the --profile pass
        with tempfile.TemporaryDirectory(prefix="personavec-bench-") as tmp:
            self.tmp = tmp
            vdir = Path(tmp) / "vectors"
            vdir.mkdir()
            self.vectors, self.vector_source = self.choose_vectors(vdir)
            log(f"model {self.model}; vectors: {self.vector_source}")
            total = sum(self.per_level.values())
            log(
                f"levels {self.levels}, requests {[self.per_level[c] for c in self.levels]} "
                f"({total} per scenario), scenarios {', '.join(self.scenarios)}"
            )
            self.run_server_scenarios([k for k in self.scenarios if k not in HF_SCENARIOS])
            hf_keys = [k for k in self.scenarios if k in HF_SCENARIOS]
            if hf_keys:
                self.run_hf(hf_keys)

        stats = [self.measured[(s.scenario, s.concurrency, s.pass_index)] for s in summarize_all(self.results)]
        machine["load average at end (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        v = self.vectors
        config = {
            "model": f"{self.model} ({v.num_layers} layers), dtype float32",
            "vLLM mode": "eager (--enforce-eager)" if a.enforce_eager else "compiled (vLLM default, Inductor)",
            "server options": " ".join(self.server_args("<vectors>")[2:]),
            "server environment (both)": " ".join(f"{k}={v}" for k, v in a.server_env) or "inherited, nothing added",
            "workload": cfg.describe(),
            "requests per level": ", ".join(f"c={c}: {self.per_level[c]}" for c in self.levels),
            "client": f"aiohttp, closed loop of `concurrency` clients, {'' if a.stream else 'non-'}streaming "
            + (
                "/v1/chat/completions with text prompts (the workload's tokens decoded)"
                if a.api == "chat"
                else "/v1/completions with token-id prompts"
            )
            + f"; tok/s = output tokens / (first send to last token); {a.passes} interleaved pass(es)",
            "vectors": f"{self.vector_source}: {', '.join(v.names)}; recommended layers {list(v.layers)}, norms "
            f"there {', '.join(f'{n:.2f}' for n in v.norms)}",
            "HF reference": (
                f"transformers, float32, {self.hf_threads} torch thread(s) (as many as vLLM's worker "
                "unless --hf-threads), KV cache, static batches"
                if hasattr(self, "hf_threads")
                else "not run"
            ),
        }
        report = Report(
            command=self.command,
            machine=machine,
            config=config,
            stats=stats,
            requests=self.results,
            checks=self.checks,
            notes=self.notes,
            wall_s=time.monotonic() - t_start,
            profile=profile_table(self.profiled) if self.profiled else "",
        )
        files = write_report(report, self.out, a.prefix)
        from personavec_vllm.bench.report import ratio_table

        print(ratio_table(stats))
        log(f"done in {(time.monotonic() - t_start) / 60:.1f} min; wrote " + ", ".join(str(p) for p in files.values()))
        errors = sum(s.errors for s in stats)
        if errors:
            log(f"{errors} requests failed; see {files['requests_csv']}")
            return 1
        return 0


def main_from_args(args: argparse.Namespace, command: str) -> int:
    return Bench(args, command).run()
