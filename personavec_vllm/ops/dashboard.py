"""The Grafana dashboard (`personavec deploy dashboard`): panels on the persona metrics, from the
same recording rules and signed sums as the alerts (`ops.rules`)."""

from __future__ import annotations

import json

from personavec_vllm.ops.rules import DASHBOARD_UID, RECORD_THRESHOLD

DASHBOARD_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$model": ".*",
    "$vector": ".*",
    "$layer": ".*",
}

_P = 'model=~"$model", vector=~"$vector", layer=~"$layer"'


def _projection_mean(kind: str) -> str:
    by = "sum by (vector, model, layer)"
    sel = f'{{kind="{kind}", {_P}}}'
    return (
        f"(\n  {by} (rate(personavec_projection_sum_pos_total{sel}[$__rate_interval]))\n"
        f"  - {by} (rate(personavec_projection_sum_neg_total{sel}[$__rate_interval]))\n)\n"
        f"/ ({by} (rate(personavec_projection_count{sel}[$__rate_interval])) > 0)"
    )


def _quantiles(metric: str) -> list[tuple[str, str]]:
    return [
        (
            f'histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{model_name=~"$model"}}[$__rate_interval])))',
            f"p{int(q * 100)}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


def dashboard() -> dict:
    """The Grafana dashboard (JSON model) of persona monitoring and vLLM serving."""
    ds = {"type": "prometheus", "uid": "${datasource}"}
    panels: list[dict] = []
    y = 0

    def row(title: str) -> None:
        nonlocal y
        panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "id": len(panels) + 1,
            }
        )
        y += 1

    def panel(
        title: str,
        targets: list[tuple[str, str]],
        *,
        kind: str = "timeseries",
        w: int = 12,
        h: int = 8,
        x: int = 0,
        unit: str = "short",
        description: str = "",
        **extra,
    ) -> dict:
        p = {
            "id": len(panels) + 1,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": ds,
            "gridPos": {"h": h, "w": w, "x": x, "y": y},
            "targets": [
                {"refId": chr(ord("A") + i), "datasource": ds, "expr": expr, "legendFormat": legend, "range": True}
                for i, (expr, legend) in enumerate(targets)
            ],
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {
                "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                "tooltip": {"mode": "multi"},
            },
        }
        p.update(extra)
        panels.append(p)
        return p

    row("Persona traits")
    panel(
        "Mean reply projection per trait (response_mean) and alert thresholds",
        [
            (_projection_mean("response_mean"), "{{vector}} L{{layer}} {{model}}"),
            (
                f'max by (vector, layer, severity) ({RECORD_THRESHOLD}{{vector=~"$vector", layer=~"$layer"}})',
                "{{vector}} L{{layer}} {{severity}} threshold",
            ),
        ],
        description="Mean projection h.v/|v| of generated tokens on each persona vector, per reply, "
        "averaged over the rate interval. Dashed lines: the drift alert thresholds from the "
        "vector's extraction statistics (recording rule personavec:drift_threshold).",
        fieldConfig={
            "defaults": {"unit": "short"},
            "overrides": [
                {
                    "matcher": {"id": "byRegexp", "options": ".*threshold"},
                    "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}],
                }
            ],
        },
    )
    panel(
        "Mean prompt projection per trait (prompt_last)",
        [(_projection_mean("prompt_last"), "{{vector}} L{{layer}} {{model}}")],
        x=12,
        description="Projection at the last prompt token: predicts the reply's trait before any token is generated.",
    )
    y += 8
    panel(
        "Projection distribution: $vector (response_mean)",
        [
            (
                'sum by (le) (increase(personavec_projection_bucket{kind="response_mean", '
                + _P
                + "}[$__rate_interval]))",
                "{{le}}",
            )
        ],
        kind="heatmap",
        w=24,
        repeat="vector",
        repeatDirection="h",
        maxPerRow=3,
        description="Replies per projection bucket (buckets are fitted to each vector's extraction "
        "statistics). One heatmap per vector.",
        options={
            "calculate": False,
            "yAxis": {"unit": "short"},
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
            "tooltip": {"mode": "single", "yHistogram": True},
            "legend": {"show": True},
        },
    )
    panels[-1]["targets"][0]["format"] = "heatmap"
    y += 8
    panel(
        "Steered requests/s by vector",
        [
            (
                'sum by (vector) (rate(personavec_steered_requests_total{model=~"$model", vector=~"$vector"}[$__rate_interval]))',
                "{{vector}}",
            )
        ],
        w=8,
        unit="reqps",
    )
    panel(
        "Monitored requests/s by vector",
        [
            (
                'sum by (vector) (rate(personavec_monitored_requests_total{model=~"$model", vector=~"$vector"}[$__rate_interval]))',
                "{{vector}}",
            )
        ],
        w=8,
        x=8,
        unit="reqps",
    )
    panel(
        "Rejected persona requests/s by reason",
        [
            (
                'sum by (reason) (rate(personavec_rejected_requests_total{model=~"$model"}[$__rate_interval]))',
                "{{reason}}",
            )
        ],
        w=8,
        x=16,
        unit="reqps",
        description="Persona fields refused with HTTP 400 (the error names the field).",
    )
    y += 8
    panel(
        "Firing and pending persona alerts",
        [
            (
                'sum by (alertname, alertstate, severity, vector, model, reason) (ALERTS{alertname=~"Persona.*"})',
                "{{alertstate}} {{alertname}} {{severity}} {{vector}}{{reason}} {{model}}",
            )
        ],
        w=24,
        h=6,
        unit="none",
        description="Alerts from the personavec rules (Prometheus ALERTS series).",
    )
    y += 6
    row("vLLM serving")
    m = 'model_name=~"$model"'
    panel(
        "Token throughput",
        [
            (f"sum(rate(vllm:generation_tokens_total{{{m}}}[$__rate_interval]))", "generated tokens/s"),
            (f"sum(rate(vllm:prompt_tokens_total{{{m}}}[$__rate_interval]))", "prompt tokens/s"),
        ],
        w=8,
        unit="short",
    )
    panel(
        "Requests running and waiting",
        [(f"sum(vllm:num_requests_running{{{m}}})", "running"), (f"sum(vllm:num_requests_waiting{{{m}}})", "waiting")],
        w=8,
        x=8,
        unit="short",
    )
    panel(
        "Finished requests/s by reason",
        [
            (
                f"sum by (finished_reason) (rate(vllm:request_success_total{{{m}}}[$__rate_interval]))",
                "{{finished_reason}}",
            )
        ],
        w=8,
        x=16,
        unit="reqps",
    )
    y += 8
    panel("End-to-end request latency", _quantiles("vllm:e2e_request_latency_seconds"), w=8, unit="s")
    panel("Time to first token", _quantiles("vllm:time_to_first_token_seconds"), w=8, x=8, unit="s")
    panel("Inter-token latency", _quantiles("vllm:inter_token_latency_seconds"), w=8, x=16, unit="s")
    y += 8
    panel("KV cache usage", [(f"avg(vllm:kv_cache_usage_perc{{{m}}})", "used")], w=8, unit="percentunit")
    panel("Queue time", _quantiles("vllm:request_queue_time_seconds"), w=8, x=8, unit="s")
    panel(
        "Preemptions/s",
        [(f"sum(rate(vllm:num_preemptions_total{{{m}}}[$__rate_interval]))", "preemptions")],
        w=8,
        x=16,
        unit="short",
    )

    def variable(name: str, query: str, label: str) -> dict:
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": ds,
            "query": {"query": query, "refId": f"{name}-var"},
            "definition": query,
            "refresh": 2,
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
            "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        }

    return {
        "uid": DASHBOARD_UID,
        "title": "personavec: persona vectors on vLLM",
        "description": "Per-trait projections, steering and monitoring traffic, rejections, and vLLM "
        "throughput and latency. Generated by `personavec deploy dashboard`.",
        "tags": ["personavec", "vllm"],
        "timezone": "browser",
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {"selected": True, "text": "Prometheus", "value": "prometheus"},
                },
                variable("model", "label_values(personavec_rejected_requests_total, model)", "Model"),
                variable("vector", 'label_values(personavec_projection_count{model=~"$model"}, vector)', "Vector"),
                variable(
                    "layer",
                    'label_values(personavec_projection_count{model=~"$model", vector=~"$vector"}, layer)',
                    "Layer",
                ),
            ]
        },
        "panels": panels,
    }


def panel_queries(board: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel."""
    out = []
    for p in board["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    return out


def plain_promql(expr: str) -> str:
    """A panel's PromQL with Grafana's variables replaced by plain values."""
    for name in sorted(DASHBOARD_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, DASHBOARD_VARIABLES[name])
    return expr


def render_dashboard() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"
