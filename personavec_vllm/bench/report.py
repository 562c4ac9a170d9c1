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

from personavec_vllm.bench.scenarios import BASELINE, BASELINES, BY_KEY, SCENARIOS, label


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
    first_token: float
    end: float
    error: str = ""

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
    keys = {(r.scenario, r.concurrency) for r in results}
    if len(keys) != 1:
        raise ValueError(f"results of several levels: {sorted(keys)}")
    scenario, concurrency = keys.pop()
    ok = [r for r in results if not r.error]
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
        ttft_p50=percentile([r.ttft for r in ok], 50),
        ttft_p99=percentile([r.ttft for r in ok], 99),
        errors=len(results) - len(ok),
    )


def summarize_all(results: Iterable[RequestResult]) -> list[LevelStats]:
    groups: dict[tuple[str, int], list[RequestResult]] = {}
    for r in results:
        groups.setdefault((r.scenario, r.concurrency), []).append(r)
    order = {s.key: i for i, s in enumerate(SCENARIOS)}
    keys = sorted(groups, key=lambda k: (order.get(k[0], len(order)), k[1]))
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


def baseline_rates(stats: Sequence[LevelStats], baselines: Sequence[str] = BASELINES) -> dict[int, float]:
    """Per concurrency, the mean output tok/s of the baseline scenarios measured there (scenario 1,
    and 1' when the plain server ran a second time after the personavec server)."""
    rates: dict[int, list[float]] = {}
    for s in stats:
        if s.scenario in baselines and not math.isnan(s.tok_per_s):
            rates.setdefault(s.concurrency, []).append(s.tok_per_s)
    return {c: sum(v) / len(v) for c, v in rates.items()}


def ratios(stats: Sequence[LevelStats], baselines: Sequence[str] = BASELINES) -> dict[tuple[str, int], float]:
    """Output tok/s of each (scenario, concurrency) over the baseline at the same concurrency."""
    base = baseline_rates(stats, baselines)
    return {
        (s.scenario, s.concurrency): s.tok_per_s / base[s.concurrency]
        for s in stats
        if s.concurrency in base and base[s.concurrency] > 0
    }


def speedup(stats: Sequence[LevelStats], num: str, den: str) -> dict[int, float]:
    """tok/s of scenario `num` over scenario `den`, per concurrency."""
    a = {s.concurrency: s.tok_per_s for s in stats if s.scenario == num}
    b = {s.concurrency: s.tok_per_s for s in stats if s.scenario == den}
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
    Target("3, 4 >= 0.97 x plain vLLM", ("steer_same", "steer_distinct"), 0.97),
    Target("5 >= 0.95 x plain vLLM", ("monitor1", "monitor3"), 0.95),
    Target(
        "5c, 5d >= 0.97 x 2 (plugin, unsteered) at concurrency 32",
        ("ops", "policy_monitor3"),
        0.97,
        over="unsteered",
        concurrency=32,
    ),
    Target(
        "4 >= 5 x 6b (HF, distinct specs) at concurrency 32",
        ("steer_distinct",),
        5.0,
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


def _fmt(v: float, digits: int = 1) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _levels(stats: Sequence[LevelStats]) -> list[int]:
    return sorted({s.concurrency for s in stats})


def _scenarios(stats: Sequence[LevelStats]) -> list[str]:
    present = {s.scenario for s in stats}
    return [s.key for s in SCENARIOS if s.key in present]


def ratio_table(stats: Sequence[LevelStats]) -> str:
    """Markdown: output tok/s ratio to the baseline, scenarios x concurrency."""
    levels, r = _levels(stats), ratios(stats)
    lines = ["| scenario | " + " | ".join(f"c={c}" for c in levels) + " |", "|---|" + "---:|" * len(levels)]
    for key in _scenarios(stats):
        cells = [_fmt(r.get((key, c), math.nan), 3) for c in levels]
        lines.append(f"| {label(key)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def full_table(stats: Sequence[LevelStats]) -> str:
    r = ratios(stats)
    lines = [
        "| scenario | conc. | requests | output tok/s | ratio to baseline | latency p50 (s) | latency p99 (s) "
        "| TTFT p50 (s) | TTFT p99 (s) | errors | other CPU (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in stats:
        lines.append(
            f"| {label(s.scenario)} | {s.concurrency} | {s.requests} | {_fmt(s.tok_per_s)} | "
            f"{_fmt(r.get((s.scenario, s.concurrency), math.nan), 3)} | {_fmt(s.latency_p50, 2)} | "
            f"{_fmt(s.latency_p99, 2)} | {_fmt(s.ttft_p50, 2)} | {_fmt(s.ttft_p99, 2)} | {s.errors} | "
            f"{_fmt(s.other_cpu, 2)} |"
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
    for row in evaluate_targets(stats):
        measured = ", ".join(f"c={c}: {v:.3f}" for c, v in sorted(row["measured"].items())) or "not measured"
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
    twice = any(s.scenario == "plain_after" for s in report.stats)
    parts += ["## Output tokens/s relative to plain vLLM (the headline)", ""]
    if twice:
        parts += [
            "The baseline is the mean of scenarios 1 and 1' (the plain server before and after the "
            "personavec server) at the same concurrency; their own ratios show how far the machine "
            "drifted during the run, which bounds what the other ratios can resolve.",
            "",
        ]
    parts += [ratio_table(report.stats), ""]
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


def write_csv(stats: Sequence[LevelStats], path: Path) -> None:
    r = ratios(stats)
    names = [f.name for f in fields(LevelStats)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scenario_number", "scenario_title"] + names + ["ratio_to_baseline"])
        for s in stats:
            row = asdict(s)
            ratio = r.get((s.scenario, s.concurrency), math.nan)
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


def write_plots(stats: Sequence[LevelStats], out_dir: Path, prefix: str) -> list[Path]:
    """throughput (absolute and ratio) and latency plots; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    levels, r, keys = _levels(stats), ratios(stats), _scenarios(stats)
    by = {(s.scenario, s.concurrency): s for s in stats}
    style = {s.key: ("--" if s.group == "hf" else "-") for s in SCENARIOS}
    colors = {s.key: f"C{i}" for i, s in enumerate(SCENARIOS)}  # one color per scenario in every plot
    paths = []

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in keys:
        xs = [c for c in levels if (key, c) in by]
        ax1.plot(xs, [by[(key, c)].tok_per_s for c in xs], style[key], color=colors[key], marker="o", label=label(key))
        if BY_KEY[key].group != "hf" and (key != BASELINE or "plain_after" in keys):
            xr = [c for c in xs if (key, c) in r]
            ax2.plot(xr, [r[(key, c)] for c in xr], color=colors[key], marker="o", label=label(key))
    ax1.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="output tokens/s", title="Throughput")
    ax2.axhline(1.0, color="gray", lw=0.8)
    for t, color in ((0.99, "tab:green"), (0.97, "tab:orange"), (0.95, "tab:red")):
        ax2.axhline(t, color=color, lw=0.8, ls=":")
    ax2.set(
        xscale="log",
        xlabel="concurrency",
        ylabel="tok/s relative to plain vLLM (scenario 1)",
        title="Relative to plain vLLM (dotted: targets 0.99/0.97/0.95)",
    )
    ax1.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax1.yaxis.set_minor_formatter(NullFormatter())
    for ax in (ax1, ax2):
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(levels)
        ax.set_xticklabels([str(c) for c in levels])
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    p = out_dir / f"{prefix}_throughput.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (
        ("latency_p50", "request latency p50 (s)"),
        ("latency_p99", "request latency p99 (s)"),
        ("ttft_p50", "time to first token p50 (s)"),
    )
    for ax, (attr, title) in zip(axes, panels):
        for key in keys:
            xs = [c for c in levels if (key, c) in by]
            ax.plot(
                xs,
                [getattr(by[(key, c)], attr) for c in xs],
                style[key],
                color=colors[key],
                marker="o",
                label=label(key),
            )
        ax.set(xscale="log", yscale="log", xlabel="concurrency", title=title)
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(levels)
        ax.set_xticklabels([str(c) for c in levels])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    p = out_dir / f"{prefix}_latency.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def write_report(report: Report, out_dir: str | Path, prefix: str = "serving") -> dict[str, Path]:
    """Write `<prefix>.md`, `<prefix>.csv`, `<prefix>_requests.csv` and the PNG plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"csv": out_dir / f"{prefix}.csv", "requests_csv": out_dir / f"{prefix}_requests.csv"}
    write_csv(report.stats, files["csv"])
    write_requests_csv(report.requests, files["requests_csv"])
    plots = write_plots(report.stats, out_dir, prefix)
    for p in plots:
        files[p.stem] = p
    files["markdown"] = out_dir / f"{prefix}.md"
    files["markdown"].write_text(markdown(report, [p.name for p in plots]))
    return files
