"""The written report of one benchmark run: Markdown tables, CSV files (the plots are in
`bench.plots`).

Pure functions of the statistics in `bench.stats`, so they are unit-tested without a server.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from personavec_vllm.bench.scenarios import BASELINE, BY_KEY, SCENARIOS, label
from personavec_vllm.bench.stats import (
    LevelStats,
    Ratio,
    RequestResult,
    evaluate_targets,
    levels_of,
    median,
    rates_by_pass,
    ratio_spread,
    scenarios_of,
    speedup,
)


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


def _ratio_cell(r: Ratio | None) -> str:
    if r is None:
        return "n/a"
    if r.passes == 1:
        return f"{r.median:.3f}"
    return f"{r.median:.3f} ({r.low:.3f}-{r.high:.3f})"


def ratio_table(stats: Sequence[LevelStats], metric: str = "tok_per_s") -> str:
    """Markdown: `metric` (default output tok/s) over the baseline's, scenarios x concurrency:
    the median over passes and (in brackets) the lowest and highest pass."""
    levels, r = levels_of(stats), ratio_spread(stats, metric=metric)
    lines = ["| scenario | " + " | ".join(f"c={c}" for c in levels) + " |", "|---|" + "---:|" * len(levels)]
    for key in scenarios_of(stats):
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
    levels = levels_of(stats)
    per = {
        i: ratio_spread([s for s in stats if s.instance == i and s.pass_index >= 0], metric=metric) for i in instances
    }
    head = [f"c={c}, start {i + 1}" for c in levels for i in instances]
    lines = ["| scenario | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for key in scenarios_of(stats):
        cells = [_ratio_cell(per[i].get((key, c))) for c in levels for i in instances]
        if any(cell != "n/a" for cell in cells):
            lines.append(f"| {label(key)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def full_table(stats: Sequence[LevelStats]) -> str:
    """Every measurement (one row per scenario, concurrency and pass); the ratio is to the
    baseline of the same pass."""
    base = rates_by_pass(stats, BASELINE)
    lines = [
        "| scenario | conc. | start | pass | requests | output tok/s | ratio to baseline | latency p50 (s) | latency p99 (s) "
        "| TTFT p50 (s) | TTFT p99 (s) | errors | other CPU (cores) | worker CPU ms / output token "
        "| worker minor page faults | worker MB on huge pages | prompt tokens computed | preemptions | engine steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
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
            f"{_fmt(s.worker_minor_faults, 0)} | {_fmt(s.worker_huge_mb, 0)} | {_fmt(s.prompt_tokens_computed, 0)} | "
            f"{_fmt(s.preemptions, 0)} | {_fmt(s.engine_steps, 0)} |"
        )
    return "\n".join(lines)


def hf_table(stats: Sequence[LevelStats]) -> str:
    levels = levels_of(stats)
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
    present = set(scenarios_of(report.stats))
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
    base = rates_by_pass(stats, BASELINE)
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
