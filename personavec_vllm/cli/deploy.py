"""`personavec deploy`: Prometheus rules and the Grafana dashboard for a vector library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from personavec_vllm.ops.rules import RuleSettings


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="monitoring files for production: Prometheus rules, Grafana dashboard")
    dsub = p.add_subparsers(dest="deploy_command", metavar="ACTION", required=True)
    r = dsub.add_parser(
        "rules",
        help="write Prometheus recording and alert rules for a vector library",
        description="Write Prometheus rules: the per-trait drift mean, drift alerts at thresholds derived "
        "from each vector's stored projection statistics (midpoint of pos_mean and neg_mean "
        "at the recommended layer: warning; pos_mean: critical; raised to plain replies' mean + 2 / 4 "
        "standard errors of a --min-samples mean where recorded), a rise against the previous "
        "day, rejected persona requests and missing projections.",
        allow_abbrev=False,
    )
    d = RuleSettings()
    r.add_argument("--vectors", required=True, help="vector library folder")
    r.add_argument("--out", default=None, help="file to write (default: standard output)")
    r.add_argument(
        "--format",
        choices=("prometheus", "prometheusrule"),
        default="prometheus",
        help="a Prometheus rule file, or a Kubernetes PrometheusRule object (Prometheus Operator)",
    )
    r.add_argument("--model", default=None, help="served model name to restrict the alerts to (default: any)")
    r.add_argument("--window", default=d.window, help=f"drift mean window (default {d.window})")
    r.add_argument("--for", dest="for_", default=d.for_, help=f"alert 'for' duration (default {d.for_})")
    r.add_argument("--interval", default=d.interval, help=f"rule evaluation interval (default {d.interval})")
    r.add_argument(
        "--min-samples",
        type=int,
        default=d.min_samples,
        help=f"monitored replies in the window before drift alerts may fire (default {d.min_samples})",
    )
    r.add_argument(
        "--rise-fraction",
        type=float,
        default=d.rise_fraction,
        help=f"sudden rise threshold as a share of pos_mean - neg_mean (default {d.rise_fraction})",
    )
    r.add_argument(
        "--baseline", default=d.baseline, help=f"yesterday's mean is averaged over this long (default {d.baseline})"
    )
    r.add_argument(
        "--rejected-rate",
        type=float,
        default=d.rejected_rate,
        help=f"rejected persona requests/s per model and reason (default {d.rejected_rate})",
    )
    r.add_argument(
        "--rejected-window",
        default=d.rejected_window,
        help=f"window of the rejected rate (default {d.rejected_window})",
    )
    r.set_defaults(func=cmd_deploy_rules)
    b = dsub.add_parser("dashboard", help="write the Grafana dashboard JSON")
    b.add_argument("--out", default=None, help="file to write (default: standard output)")
    b.set_defaults(func=cmd_deploy_dashboard)


def _write(text: str, out: str | None) -> None:
    if out is None:
        sys.stdout.write(text)
        return
    from personavec_vllm.files import atomic_write_text

    path = atomic_write_text(out, text)
    print(f"wrote {path}", file=sys.stderr)


def cmd_deploy_rules(args: argparse.Namespace, extra: list[str]) -> int:
    from personavec_vllm.ops.rules import build_rules, load_library, render_rules

    try:
        settings = RuleSettings(
            window=args.window,
            for_=args.for_,
            interval=args.interval,
            min_samples=args.min_samples,
            rise_fraction=args.rise_fraction,
            baseline=args.baseline,
            rejected_rate=args.rejected_rate,
            rejected_window=args.rejected_window,
            model=args.model,
        )
        vectors = load_library(args.vectors)
    except (ValueError, OSError) as exc:  # VectorFileError is a ValueError
        print(f"personavec deploy rules: {exc}", file=sys.stderr)
        return 2
    text = render_rules(vectors, settings, source=_source_name(args.vectors), fmt=args.format)
    _write(text, args.out)
    skipped = build_rules(vectors, settings)[1]
    if skipped:
        print(f"note: no drift alerts for {', '.join(skipped)} (no projection statistics)", file=sys.stderr)
    return 0


def _source_name(directory: str) -> str:
    """The library path as written in the header: relative to the current folder when inside it,
    so the committed file does not depend on where the repository is checked out."""
    path = Path(directory).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def cmd_deploy_dashboard(args: argparse.Namespace, extra: list[str]) -> int:
    from personavec_vllm.ops.dashboard import render_dashboard

    _write(render_dashboard(), args.out)
    return 0
