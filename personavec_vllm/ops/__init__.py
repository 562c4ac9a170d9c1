"""Operations files generated from the vector library: Prometheus rules (`rules`) and the Grafana
dashboard (`dashboard`)."""

from personavec_vllm.ops.dashboard import render_dashboard
from personavec_vllm.ops.rules import RuleSettings, build_rules, load_library, render_rules, thresholds

__all__ = ["RuleSettings", "build_rules", "load_library", "render_dashboard", "render_rules", "thresholds"]
