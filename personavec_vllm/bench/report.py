"""Statistics and the written report: Markdown, CSV and PNG plots.

Pure functions of the per-request timings the runner measured, so they are unit-tested
without a server.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from personavec_vllm.bench.scenarios import BASELINE, BY_KEY, SCENARIOS, label


@dataclass
class RequestResult:
    """One request's timing, in seconds from the start of its level (its scenario and
    concurrency). `first_token` is when the first output token arrived (streaming)."""

    scenario: str
    concurrency: int
    index: int
    prompt_len: int
    output_len: int  # asked for
    output_tokens: int  # received
    submit: float
    first_token: float  # NaN when not streaming
    end: float
    error: str = ""
    pass_index: int = 0  # which pass of the interleaved measurement (HF: -1, measured once)

    @property
    def latency(self) -> float:
        return self.end - self.submit

    @property
    def ttft(self) -> float:
        return self.first_token - self.submit


@dataclass
class LevelStats:
    scenario: str
    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    tok_per_s: float
    latency_p50: float
    latency_p99: float
    ttft_p50: float
    ttft_p99: float
    errors: int
    # CPU that processes other than the benchmark and its server used meanwhile (cores, steal
    # included): other tenants of a shared machine, the reason to distrust a level
    other_cpu: float = math.nan
    pass_index: int = 0
    # CPU seconds the server's processes used over the level (/proc; NaN for the HF reference):
    # unlike wall time, not stretched by waiting for a core (other tenants, steal)
    server_cpu_s: float = math.nan
    worker_cpu_s: float = math.nan
    instance: int = 0  # which start of the servers measured it (--instances)
    worker_minor_faults: float = math.nan  # pages the worker got fresh from the kernel over the level
    # vLLM's counters over the level: prompt tokens computed (prefix-cache hits excluded), preemptions
    prompt_tokens_computed: float = math.nan
    preemptions: float = math.nan
    engine_steps: float = math.nan

    @property
    def tok_per_worker_cpu_s(self) -> float:
        """Output tokens per CPU second of the engine's worker (where the model runs)."""
        return self.output_tokens / self.worker_cpu_s if self.worker_cpu_s > 0 else math.nan

    @property
    def tok_per_server_cpu_s(self) -> float:
        """Output tokens per CPU second of all the server's processes."""
        return self.output_tokens / self.server_cpu_s if self.server_cpu_s > 0 else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks
    (numpy's default method). NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    data = sorted(values)
    if not data:
        return math.nan
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summarize(results: Sequence[RequestResult]) -> LevelStats:
    """Stats of one level: throughput is output tokens over the level's wall time (first
    submission to last completion)."""
    if not results:
        raise ValueError("no results")
    keys = {(r.scenario, r.concurrency, r.pass_index) for r in results}
    if len(keys) != 1:
        raise ValueError(f"results of several levels: {sorted(keys)}")
    scenario, concurrency, pass_index = keys.pop()
    ok = [r for r in results if not r.error]
    ttfts = [r.ttft for r in ok if not math.isnan(r.ttft)]
    wall = max(r.end for r in results) - min(r.submit for r in results)
    tokens = sum(r.output_tokens for r in ok)
    return LevelStats(
        scenario=scenario,
        concurrency=concurrency,
        requests=len(results),
        output_tokens=tokens,
        wall_s=wall,
        tok_per_s=tokens / wall if wall > 0 else math.nan,
        latency_p50=percentile([r.latency for r in ok], 50),
        latency_p99=percentile([r.latency for r in ok], 99),
        ttft_p50=percentile(ttfts, 50),
        ttft_p99=percentile(ttfts, 99),
        errors=len(results) - len(ok),
        pass_index=pass_index,
    )


def summarize_all(results: Iterable[RequestResult]) -> list[LevelStats]:
    """One `LevelStats` per scenario, concurrency and pass."""
    groups: dict[tuple[str, int, int], list[RequestResult]] = {}
    for r in results:
        groups.setdefault((r.scenario, r.concurrency, r.pass_index), []).append(r)
    order = {s.key: i for i, s in enumerate(SCENARIOS)}
    keys = sorted(groups, key=lambda k: (order.get(k[0], len(order)), k[1], k[2]))
    return [summarize(groups[k]) for k in keys]


def closed_loop_times(measured: Sequence[tuple[float, float]], concurrency: int) -> list[tuple[float, float, float]]:
    """Submission times for requests served in order by a closed loop of `concurrency` clients.

    `measured[j] = (first_token, end)` of request j, absolute seconds from the start of a run
    that executed the requests back to back (in batches or one by one). Client
    `j % concurrency` sends request j when its previous request (j - concurrency) ends, at 0
    for the first `concurrency`. Returns `(submit, first_token, end)` per request: what
    `concurrency` clients would see, waiting in the queue included."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    out: list[tuple[float, float, float]] = []
    for j, (first, end) in enumerate(measured):
        submit = out[j - concurrency][2] if j >= concurrency else 0.0
        out.append((submit, first, end))
    return out


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


@dataclass(frozen=True)
class Ratio:
    """A scenario's output tok/s over the baseline's at one concurrency: the median over passes
    of each pass's ratio (both measured in that pass, side by side), and the lowest and highest
    pass. For the baseline itself: each pass's tok/s over the baseline's median (the noise floor)."""

    median: float
    low: float
    high: float
    passes: int


def _rates(stats: Sequence[LevelStats], key: str, metric: str = "tok_per_s") -> dict[int, dict[int, float]]:
    """{concurrency: {pass: value}} of scenario `key`; `metric`: a `LevelStats` attribute where
    higher is better (output tok/s, or output tokens per CPU second)."""
    out: dict[int, dict[int, float]] = {}
    for s in stats:
        value = getattr(s, metric)
        if s.scenario == key and not math.isnan(value):
            out.setdefault(s.concurrency, {})[s.pass_index] = value
    return out


def baseline_rates(stats: Sequence[LevelStats], baseline: str = BASELINE) -> dict[int, float]:
    """Per concurrency, the median over passes of the baseline's output tok/s."""
    return {c: median(list(by_pass.values())) for c, by_pass in _rates(stats, baseline).items()}


def ratio_spread(
    stats: Sequence[LevelStats], baseline: str = BASELINE, metric: str = "tok_per_s"
) -> dict[tuple[str, int], Ratio]:
    """`Ratio` of every (scenario, concurrency). A pass the baseline did not run in (the HF
    reference, measured once) divides by the baseline's median."""
    base = _rates(stats, baseline, metric)
    out = {}
    for key in {s.scenario for s in stats}:
        for c, by_pass in _rates(stats, key, metric).items():
            if c not in base:
                continue
            mid = median(list(base[c].values()))
            if key == baseline:
                values = [v / mid for v in by_pass.values()]
            else:
                values = [v / base[c].get(p, mid) for p, v in by_pass.items()]
            if values and mid > 0:
                out[(key, c)] = Ratio(median(values), min(values), max(values), len(values))
    return out


def ratios(stats: Sequence[LevelStats], baseline: str = BASELINE) -> dict[tuple[str, int], float]:
    """The median ratio of each (scenario, concurrency) (see `Ratio`)."""
    return {k: r.median for k, r in ratio_spread(stats, baseline).items()}


def speedup(stats: Sequence[LevelStats], num: str, den: str) -> dict[int, float]:
    """Median tok/s of scenario `num` over that of scenario `den`, per concurrency."""
    a, b = baseline_rates(stats, num), baseline_rates(stats, den)
    return {c: a[c] / b[c] for c in sorted(a) if c in b and b[c] > 0}


@dataclass(frozen=True)
class Target:
    text: str
    scenarios: tuple[str, ...]
    minimum: float
    over: str = BASELINE  # ratio over this scenario (BASELINE: over the baseline, see `ratios`)
    concurrency: int | None = None  # None: every level


TARGETS = (
    Target("2 >= 0.99 x plain vLLM", ("unsteered",), 0.99),
    Target("3, 4 >= 0.98 x plain vLLM", ("steer_same", "steer_distinct"), 0.98),
    Target("5a, 5b, 5d >= 0.97 x plain vLLM", ("monitor1", "monitor3", "policy_monitor3"), 0.97),
    Target(
        "5c >= 0.97 x 2 (plugin, unsteered) at concurrency 32",
        ("ops",),
        0.97,
        over="unsteered",
        concurrency=32,
    ),
    Target(
        "4 >= 8 x 6b (HF, distinct specs) at concurrency 32",
        ("steer_distinct",),
        8.0,
        over="hf_distinct",
        concurrency=32,
    ),
)


def evaluate_targets(stats: Sequence[LevelStats]) -> list[dict]:
    """One row per target and scenario: the measured ratio at each level, and whether all met."""
    rows = []
    for t in TARGETS:
        for key in t.scenarios:
            if t.over == BASELINE:
                measured = {c: v for (k, c), v in sorted(ratios(stats).items()) if k == key}
            else:
                measured = speedup(stats, key, t.over)
            if t.concurrency is not None:
                measured = {c: v for c, v in measured.items() if c == t.concurrency}
            rows.append(
                {
                    "target": t.text,
                    "scenario": key,
                    "over": t.over,
                    "minimum": t.minimum,
                    "measured": measured,
                    "met": bool(measured) and all(v >= t.minimum for v in measured.values()),
                    "evaluated": bool(measured),
                }
            )
    return rows


# ---- writing --------------------------------------------------------------------------------


@dataclass
class Report:
    command: str
    machine: dict[str, str]
    config: dict[str, str]
    stats: list[LevelStats]
    requests: list[RequestResult] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_s: float = math.nan
    profile: str = ""  # Markdown of `--profile`'s extra pass (bench.profile)


def _fmt(v: float, digits: int = 1) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _levels(stats: Sequence[LevelStats]) -> list[int]:
    return sorted({s.concurrency for s in stats})


def _scenarios(stats: Sequence[LevelStats]) -> list[str]:
    present = {s.scenario for s in stats}
    return [s.key for s in SCENARIOS if s.key in present]


def _ratio_cell(r: Ratio | None) -> str:
    if r is None:
        return "n/a"
    if r.passes == 1:
        return f"{r.median:.3f}"
    return f"{r.median:.3f} ({r.low:.3f}-{r.high:.3f})"


def ratio_table(stats: Sequence[LevelStats], metric: str = "tok_per_s") -> str:
    """Markdown: `metric` (default output tok/s) over the baseline's, scenarios x concurrency:
    the median over passes and (in brackets) the lowest and highest pass."""
    levels, r = _levels(stats), ratio_spread(stats, metric=metric)
    lines = ["| scenario | " + " | ".join(f"c={c}" for c in levels) + " |", "|---|" + "---:|" * len(levels)]
    for key in _scenarios(stats):
        if not any((key, c) in r for c in levels):
            continue
        cells = [_ratio_cell(r.get((key, c))) for c in levels]
        lines.append(f"| {label(key)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def instance_table(stats: Sequence[LevelStats], metric: str = "tok_per_s") -> str:
    """Markdown: the median same-pass ratio of each scenario per server instance (--instances),
    scenarios x (concurrency, instance): a server start's own bias shows as a row whose
    instances disagree beyond their passes' spread."""
    instances = sorted({s.instance for s in stats if s.pass_index >= 0})
    levels = _levels(stats)
    per = {
        i: ratio_spread([s for s in stats if s.instance == i and s.pass_index >= 0], metric=metric) for i in instances
    }
    head = [f"c={c}, start {i + 1}" for c in levels for i in instances]
    lines = ["| scenario | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for key in _scenarios(stats):
        cells = [_ratio_cell(per[i].get((key, c))) for c in levels for i in instances]
        if any(cell != "n/a" for cell in cells):
            lines.append(f"| {label(key)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def full_table(stats: Sequence[LevelStats]) -> str:
    """Every measurement (one row per scenario, concurrency and pass); the ratio is to the
    baseline of the same pass."""
    base = _rates(stats, BASELINE)
    lines = [
        "| scenario | conc. | start | pass | requests | output tok/s | ratio to baseline | latency p50 (s) | latency p99 (s) "
        "| TTFT p50 (s) | TTFT p99 (s) | errors | other CPU (cores) | worker CPU ms / output token "
        "| worker minor page faults | prompt tokens computed | preemptions | engine steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in stats:
        by_pass = base.get(s.concurrency, {})
        den = by_pass.get(s.pass_index) or (median(list(by_pass.values())) if by_pass else math.nan)
        ratio = s.tok_per_s / den if den and not math.isnan(den) else math.nan
        lines.append(
            f"| {label(s.scenario)} | {s.concurrency} | {s.instance + 1 if s.pass_index >= 0 else ''} | "
            f"{s.pass_index if s.pass_index >= 0 else 'once'} | "
            f"{s.requests} | {_fmt(s.tok_per_s)} | {_fmt(ratio, 3)} | {_fmt(s.latency_p50, 2)} | "
            f"{_fmt(s.latency_p99, 2)} | {_fmt(s.ttft_p50, 2)} | {_fmt(s.ttft_p99, 2)} | {s.errors} | "
            f"{_fmt(s.other_cpu, 2)} | {_fmt(1000 * s.worker_cpu_s / s.output_tokens if s.output_tokens else math.nan, 2)} | "
            f"{_fmt(s.worker_minor_faults, 0)} | {_fmt(s.prompt_tokens_computed, 0)} | "
            f"{_fmt(s.preemptions, 0)} | {_fmt(s.engine_steps, 0)} |"
        )
    return "\n".join(lines)


def hf_table(stats: Sequence[LevelStats]) -> str:
    levels = _levels(stats)
    pairs = [("steer_distinct", "hf_distinct"), ("steer_same", "hf_same")]
    lines = [
        "| vLLM + personavec over HF reference | " + " | ".join(f"c={c}" for c in levels) + " |",
        "|---|" + "---:|" * len(levels),
    ]
    for num, den in pairs:
        sp = speedup(stats, num, den)
        if sp:
            lines.append(
                f"| {label(num)} / {label(den)} | "
                + " | ".join(_fmt(sp.get(c, math.nan), 1) + ("x" if c in sp else "") for c in levels)
                + " |"
            )
    return "\n".join(lines)


def targets_table(stats: Sequence[LevelStats]) -> str:
    lines = ["| target | scenario | measured | met |", "|---|---|---|---|"]
    spread = ratio_spread(stats)
    for row in evaluate_targets(stats):
        cells = {
            c: _ratio_cell(spread.get((row["scenario"], c))) if row["over"] == BASELINE else f"{v:.3f}"
            for c, v in row["measured"].items()
        }
        measured = ", ".join(f"c={c}: {cell}" for c, cell in sorted(cells.items())) or "not measured"
        met = ("yes" if row["met"] else "**no**") if row["evaluated"] else "n/a"
        lines.append(f"| {row['target']} | {label(row['scenario'])} | {measured} | {met} |")
    return "\n".join(lines)


def markdown(report: Report, plot_files: Sequence[str] = ()) -> str:
    parts = ["# personavec serving benchmark", ""]
    parts += ["Command:", "", "```bash", report.command, "```", ""]
    if not math.isnan(report.wall_s):
        parts += [f"Wall time of the whole run: {report.wall_s / 60:.1f} min.", ""]
    parts += ["## Machine", ""] + [f"- {k}: {v}" for k, v in report.machine.items()] + [""]
    parts += ["## Configuration", ""] + [f"- {k}: {v}" for k, v in report.config.items()] + [""]
    parts += ["## Scenarios", ""]
    present = set(_scenarios(report.stats))
    parts += [f"- **{s.number} {s.title}**: {s.description}" for s in SCENARIOS if s.key in present] + [""]
    passes = max((s.pass_index for s in report.stats), default=0) + 1
    parts += ["## Output tokens/s relative to plain vLLM (the headline)", ""]
    parts += [
        f"Both servers ran side by side; each of the {passes} pass(es) measured every scenario once per "
        "concurrency, in a rotated order. A cell is the median over passes of the scenario's tok/s over "
        "plain vLLM's in the same pass, with the lowest and highest pass in brackets. Row 1 is plain "
        "vLLM's own pass-to-pass spread around its median: the noise floor of a pass. Row 1b, where "
        "run, is a second plain vLLM server over the first in the same pass: the noise floor of a "
        "ratio between two servers, which the other rows must beat.",
        "",
    ]
    parts += [ratio_table(report.stats), ""]
    if len({s.instance for s in report.stats}) > 1:
        parts += ["### Per server start (--instances)", ""]
        parts += [
            "The same ratios, one column per start of the servers. Passes of one start share what "
            "the start gave each server; fresh starts do not.",
            "",
            "Output tok/s:",
            "",
            instance_table(report.stats),
            "",
            "Worker output tokens per CPU second:",
            "",
            instance_table(report.stats, "tok_per_worker_cpu_s"),
            "",
        ]
    if any(not math.isnan(s.tok_per_worker_cpu_s) for s in report.stats):
        parts += ["## Output tokens per CPU second relative to plain vLLM", ""]
        parts += [
            "The same measurements counted in CPU seconds (/proc) instead of wall time: time a process "
            "waited for a core (other tenants, the hypervisor's steal) is not in them, so these ratios "
            "are steadier than the headline's on a shared machine. The worker is the process that runs "
            "the model; the whole server adds the API server and the engine core (whose busy-wait for "
            "the worker grows with wall time).",
            "",
            "Worker:",
            "",
            ratio_table(report.stats, "tok_per_worker_cpu_s"),
            "",
            "Whole server:",
            "",
            ratio_table(report.stats, "tok_per_server_cpu_s"),
            "",
        ]
    if report.profile:
        parts += ["## Where the time goes (sampling profile, one extra pass)", "", report.profile, ""]
    if any(s.scenario in ("hf_same", "hf_distinct") for s in report.stats):
        parts += ["## Against the HF transformers reference (output tokens/s ratio)", "", hf_table(report.stats), ""]
    parts += ["## Targets (measured, not asserted)", "", targets_table(report.stats), ""]
    parts += ["## All measurements", "", full_table(report.stats), ""]
    for name in plot_files:
        parts += [f"![{Path(name).stem}]({Path(name).name})", ""]
    if report.checks:
        parts += ["## Checks", ""] + [f"- {c}" for c in report.checks] + [""]
    if report.notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    return "\n".join(parts)


def _pass_ratios(stats: Sequence[LevelStats]) -> dict[tuple[str, int, int], float]:
    """Each measurement's tok/s over the baseline's in the same pass (its median where the
    baseline did not run in that pass)."""
    base = _rates(stats, BASELINE)
    out = {}
    for s in stats:
        by_pass = base.get(s.concurrency)
        if by_pass:
            den = by_pass.get(s.pass_index) or median(list(by_pass.values()))
            out[(s.scenario, s.concurrency, s.pass_index)] = s.tok_per_s / den
    return out


def write_csv(stats: Sequence[LevelStats], path: Path) -> None:
    r = _pass_ratios(stats)
    names = [f.name for f in fields(LevelStats)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scenario_number", "scenario_title"] + names + ["ratio_to_baseline"])
        for s in stats:
            row = asdict(s)
            ratio = r.get((s.scenario, s.concurrency, s.pass_index), math.nan)
            w.writerow(
                [BY_KEY[s.scenario].number, BY_KEY[s.scenario].title]
                + [_csv_value(row[n]) for n in names]
                + [_csv_value(ratio)]
            )


def write_requests_csv(results: Sequence[RequestResult], path: Path) -> None:
    names = [f.name for f in fields(RequestResult)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        for res in results:
            row = asdict(res)
            w.writerow([_csv_value(row[n]) for n in names])


def _csv_value(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def write_report(report: Report, out_dir: str | Path, prefix: str = "serving") -> dict[str, Path]:
    """Write `<prefix>.md`, `<prefix>.csv`, `<prefix>_requests.csv` and the PNG plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"csv": out_dir / f"{prefix}.csv", "requests_csv": out_dir / f"{prefix}_requests.csv"}
    write_csv(report.stats, files["csv"])
    write_requests_csv(report.requests, files["requests_csv"])
    from personavec_vllm.bench.plots import write_plots

    plots = write_plots(report.stats, out_dir, prefix)
    for p in plots:
        files[p.stem] = p
    files["markdown"] = out_dir / f"{prefix}.md"
    files["markdown"].write_text(markdown(report, [p.name for p in plots]))
    return files
