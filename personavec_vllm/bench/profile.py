"""Where a server's time goes during a measurement: CPU seconds of each of its processes (API
server, engine core, worker) from /proc, and, with `--profile`, py-spy sampling profiles of the
same processes with the share of samples spent in our code.

CPU seconds per output token do not count time a process waited for the CPU (another tenant,
the hypervisor's steal), so their ratio to plain vLLM resolves a few per cent where wall-clock
throughput on a shared 2-core machine moves by 10-20 % between passes.

A sample counts as ours when its innermost `personavec_vllm` frame calls no vLLM code below it:
our runner hooks wrap vLLM's whole forward, and time in vLLM under such a wrapper is vLLM's.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("api server", "engine core", "worker")
OURS = "personavec_vllm/"
# py-spy's raw format: `frame;frame;... count`, a frame `function (file:line)`, outermost first
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def server_roles(pids: Sequence[int], leader: int) -> dict[str, int]:
    """The server's processes by role, from the titles vLLM gives them; the group leader (the
    `personavec serve` / `vllm serve` process) is the API server."""
    roles = {"api server": leader}
    for pid in pids:
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"VLLM::EngineCore" in cmdline:
                roles.setdefault("engine core", pid)
            elif b"VLLM::Worker" in cmdline:
                roles.setdefault("worker", pid)
    return roles


@dataclass(frozen=True)
class ProcStat:
    """What /proc/<pid>/stat says of a process (all its threads)."""

    cpu_s: float  # utime + stime
    minor_faults: int  # page faults served without I/O: first touches of memory the kernel hands out


def anon_huge_mb(pid: int) -> float:
    """MB of the process's anonymous memory on transparent huge pages (2 MB pages: fewer TLB
    misses, and a physical layout that does not change from one start to the next); NaN once
    it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return float("nan")
    for line in text.splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) / 1024
    return 0.0


def proc_stat(pid: int) -> ProcStat | None:
    """The process's CPU seconds and minor page faults so far; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return ProcStat((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7]))


@dataclass
class ProcessUsage:
    """CPU seconds and minor page faults of each role over one measurement, and its memory on
    huge pages at the end (NaN for a role whose process is gone). Faults say whether a process
    keeps getting fresh pages from the kernel for buffers it frees and allocates again every
    step (glibc returning them)."""

    seconds: dict[str, float] = field(default_factory=dict)
    minor_faults: dict[str, float] = field(default_factory=dict)
    huge_mb: dict[str, float] = field(default_factory=dict)

    @classmethod
    @contextlib.contextmanager
    def measure(cls, roles: dict[str, int]) -> Iterator[ProcessUsage]:
        out = cls()
        before = {role: proc_stat(pid) for role, pid in roles.items()}
        try:
            yield out
        finally:
            for role, pid in roles.items():
                start, end = before[role], proc_stat(pid)
                if start is None or end is None:
                    out.seconds[role] = out.minor_faults[role] = float("nan")
                else:
                    out.seconds[role] = end.cpu_s - start.cpu_s
                    out.minor_faults[role] = end.minor_faults - start.minor_faults
                out.huge_mb[role] = anon_huge_mb(pid)


# vLLM's counters ------------------------------------------------------------------------------

ENGINE_COUNTERS = (
    "vllm:prompt_tokens_total",
    "vllm:prompt_tokens_cached_total",
    "vllm:num_preemptions_total",
    "vllm:iteration_tokens_total_count",  # one observation per engine step
)


def engine_counters(base_url: str) -> dict[str, float]:
    """vLLM's own Prometheus counters of the work done (summed over engines and labels)."""
    import urllib.request

    with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=60) as resp:
        text = resp.read().decode()
    out = dict.fromkeys(ENGINE_COUNTERS, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


@dataclass
class EngineWork:
    """What the engine computed over one measurement: prompt tokens after prefix-cache hits,
    preemptions (each recomputes a request's tokens) and steps. The same requests can cost very different
    work depending on when they reach the scheduler; this says how much a measurement did."""

    prompt_tokens_computed: float = float("nan")
    preemptions: float = float("nan")
    steps: float = float("nan")  # engine steps (forward passes): a decode step reads every weight once

    @classmethod
    @contextlib.contextmanager
    def measure(cls, base_url: str) -> Iterator[EngineWork]:
        out = cls()
        before = engine_counters(base_url)
        try:
            yield out
        finally:
            after = engine_counters(base_url)
            d = {k: after[k] - before[k] for k in ENGINE_COUNTERS}
            out.prompt_tokens_computed = d["vllm:prompt_tokens_total"] - d["vllm:prompt_tokens_cached_total"]
            out.preemptions = d["vllm:num_preemptions_total"]
            out.steps = d["vllm:iteration_tokens_total_count"]


# sampling profiles ----------------------------------------------------------------------------


def py_spy() -> str:
    """The py-spy executable (the `bench` extra installs it beside this interpreter)."""
    import sys

    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if not found:
        raise RuntimeError("--profile needs py-spy: pip install 'personavec-vllm[bench]' (or py-spy)")
    return found


@contextlib.contextmanager
def sampling(roles: dict[str, int], out_dir: Path, label: str, rate: int = 50) -> Iterator[dict[str, Path]]:
    """py-spy (non-blocking: the processes are never paused) on every role while the body runs;
    yields the raw stack files, complete once the body has returned."""
    exe = py_spy()
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {role: out_dir / f"{label}_{role.replace(' ', '_')}.txt" for role in roles}
    procs = []
    for role, pid in roles.items():
        cmd = [exe, "record", "--nonblocking", "--full-filenames", "--rate", str(rate), "--format", "raw"]
        cmd += ["-o", str(files[role])]
        cmd += ["--pid", str(pid)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        _wait_until_sampling(proc)
    try:
        yield files
    finally:
        for p in procs:  # py-spy writes its file on SIGINT
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _wait_until_sampling(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Return once py-spy says it samples (attaching takes up to a second: a short measurement
    would otherwise go unsampled); raise with its message if it exits first."""
    import select
    import time

    out = proc.stdout  # py-spy reports on stdout, errors included (stderr is merged into it)
    assert out is not None
    said, deadline = "", time.monotonic() + timeout
    while "Sampling process" not in said:
        if proc.poll() is not None:
            raise RuntimeError(f"py-spy could not sample: {said + out.read()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"py-spy did not start sampling within {timeout:.0f} s: {said}")
        if select.select([out], [], [], 0.5)[0]:
            said += out.readline()


def _frames(stack: str) -> list[tuple[str, str]]:
    out = []
    for part in stack.split(";"):
        m = _FRAME.match(part.strip())
        out.append((m["func"], m["file"]) if m else (part.strip(), ""))
    return out


def owner(stack: str) -> str | None:
    """`module.function` of our code that a sample's time belongs to, or None when it is not ours."""
    frames = _frames(stack)
    ours = [i for i, (_, file) in enumerate(frames) if OURS in file]
    if not ours:
        return None
    inner = ours[-1]
    if any("/vllm/" in file for _, file in frames[inner + 1 :]):
        return None  # a wrapper of ours with vLLM's own work below it
    func, file = frames[inner]
    module = file.split(OURS, 1)[1].removesuffix(".py").replace("/", ".")
    return f"{module}.{func}"


@dataclass
class StackSummary:
    samples: int = 0
    ours: int = 0
    by_function: Counter = field(default_factory=Counter)

    @property
    def ours_share(self) -> float:
        return self.ours / self.samples if self.samples else float("nan")

    @property
    def ours_interval(self) -> tuple[float, float]:
        """95 % interval of `ours_share`: the share is measured within one process's own time, so
        unlike a throughput ratio it carries no drift of the machine between measurements."""
        from personavec_vllm.bench.stats import share_interval

        return share_interval(self.ours, self.samples)


def summarize_stacks(path: Path) -> StackSummary:
    """Samples in a py-spy raw file, those that are ours, and ours by function."""
    out = StackSummary()
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        out.samples += n
        who = owner(stack)
        if who is not None:
            out.ours += n
            out.by_function[who] += n
    return out


@dataclass
class ProfiledLevel:
    """One profiled measurement: the scenario, its level, output tokens, wall time and per role
    the CPU seconds and the samples."""

    scenario: str
    concurrency: int
    output_tokens: int
    wall_s: float
    cpu: dict[str, float]
    stacks: dict[str, StackSummary]


def profile_table(levels: Sequence[ProfiledLevel], top: int = 3) -> str:
    """Markdown: per measurement and process, cores used, samples, our share, and our top functions."""
    from personavec_vllm.bench.scenarios import label

    lines = [
        "| scenario | c | process | cores | CPU ms / output token | samples | ours [95 % CI] | our top functions (samples) |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for lv in levels:
        for role in ROLES:
            if role not in lv.stacks:
                continue
            s = lv.stacks[role]
            cpu = lv.cpu.get(role, float("nan"))
            tops = ", ".join(f"`{f}` ({n})" for f, n in s.by_function.most_common(top)) or "-"
            lo, hi = s.ours_interval
            lines.append(
                f"| {label(lv.scenario)} | {lv.concurrency} | {role} | {cpu / lv.wall_s:.2f} | "
                f"{1000 * cpu / max(lv.output_tokens, 1):.2f} | {s.samples} | {100 * s.ours_share:.2f} % [{100 * lo:.2f}, {100 * hi:.2f}] | {tops} |"
            )
    return "\n".join(lines)
