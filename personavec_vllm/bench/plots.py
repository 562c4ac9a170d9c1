"""The benchmark's PNG plots: throughput (absolute and relative, with the spread over passes)
and latency, one color per scenario."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from personavec_vllm.bench.scenarios import BY_KEY, SCENARIOS, label
from personavec_vllm.bench.stats import LevelStats, levels_of, ratio_spread, scenarios_of


def _medians(stats: Sequence[LevelStats]) -> dict[tuple[str, int], LevelStats]:
    """Per (scenario, concurrency), the pass with the median throughput (the lower middle one
    for an even number of passes)."""
    groups: dict[tuple[str, int], list[LevelStats]] = {}
    for s in stats:
        groups.setdefault((s.scenario, s.concurrency), []).append(s)
    return {k: sorted(v, key=lambda s: s.tok_per_s)[(len(v) - 1) // 2] for k, v in groups.items()}


def _label_log_y(ax) -> None:
    """Plain-number labels at 1, 2 and 5 per decade on a log y axis, so that data between two
    powers of ten (13-80 tok/s) still gets labels."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def write_plots(stats: Sequence[LevelStats], out_dir: Path, prefix: str) -> list[Path]:
    """throughput (absolute and ratio) and latency plots; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    levels, r, keys = levels_of(stats), ratio_spread(stats), scenarios_of(stats)
    by = _medians(stats)
    style = {s.key: ("--" if s.group == "hf" else "-") for s in SCENARIOS}
    colors = {s.key: f"C{i}" for i, s in enumerate(SCENARIOS)}  # one color per scenario in every plot
    paths = []

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in keys:
        xs = [c for c in levels if (key, c) in by]
        ax1.plot(xs, [by[(key, c)].tok_per_s for c in xs], style[key], color=colors[key], marker="o", label=label(key))
        if BY_KEY[key].group != "hf":
            xr = [c for c in xs if (key, c) in r]
            mid = [r[(key, c)].median for c in xr]
            err = [[m - r[(key, c)].low for m, c in zip(mid, xr)], [r[(key, c)].high - m for m, c in zip(mid, xr)]]
            ax2.errorbar(xr, mid, yerr=err, color=colors[key], marker="o", capsize=3, label=label(key))
    ax1.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="output tokens/s", title="Throughput")
    ax2.axhline(1.0, color="gray", lw=0.8)
    for t, color in ((0.99, "tab:green"), (0.98, "tab:orange"), (0.97, "tab:red")):
        ax2.axhline(t, color=color, lw=0.8, ls=":")
    ax2.set(
        xscale="log",
        xlabel="concurrency",
        ylabel="tok/s relative to plain vLLM, same pass",
        title="Relative to plain vLLM (median, bars: lowest/highest pass)",
    )
    _label_log_y(ax1)
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

    panels = [("latency_p50", "request latency p50 (s)"), ("latency_p99", "request latency p99 (s)")]
    if any(s.ttft_p50 > 0 for s in stats):  # NaN without streaming: nothing to draw on a log axis
        panels.append(("ttft_p50", "time to first token p50 (s)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5))
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
        _label_log_y(ax)
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
