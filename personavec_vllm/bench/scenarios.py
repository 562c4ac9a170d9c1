"""The scenarios the serving benchmark compares, and the persona spec each request carries.

Every scenario runs the same workload (`bench.workload`); only the server and the
`persona_*` fields differ. Scenario 1 is the baseline every ratio divides by.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Scenario:
    key: str
    number: str
    title: str
    description: str
    group: str  # "plain": vLLM without the plugin; "plugin": personavec serve; "plugin_off": the same
    # with PERSONAVEC_STEERING=off; "hf": transformers


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "plain",
        "1",
        "vLLM, no plugin",
        "stock vLLM: the same server command with VLLM_PLUGINS excluding personavec",
        "plain",
    ),
    Scenario(
        "plain_twin",
        "1b",
        "vLLM, no plugin, second server",
        "a second stock vLLM server started like the first: how far two identical servers differ, "
        "the noise floor for any ratio between two servers",
        "plain",
    ),
    Scenario(
        "unsteered",
        "2",
        "plugin, unsteered",
        "personavec loaded (op after every decoder layer), requests carry no persona fields",
        "plugin",
    ),
    Scenario(
        "unsteered_off",
        "2n",
        "plugin, steering off",
        "personavec loaded with PERSONAVEC_STEERING=off on a server of its own: its hooks, routes and "
        "metrics, but stock vLLM's model (no op); requests carry no persona fields. 2 against 2n is "
        "what the op costs when no request uses it",
        "plugin_off",
    ),
    Scenario(
        "steer_same",
        "3",
        "steered, one spec",
        "every request steered with the same spec (one vector, one layer)",
        "plugin",
    ),
    Scenario(
        "steer_distinct",
        "4",
        "steered, distinct specs",
        "every request a different spec: vector, sign and coefficient, layer; every third "
        "request adds a second term at another layer over all positions",
        "plugin",
    ),
    Scenario(
        "monitor1", "5a", "monitor 1 vector", "every request monitors 1 vector at its recommended layer", "plugin"
    ),
    Scenario(
        "monitor3",
        "5b",
        "monitor 3 vectors",
        "every request monitors 3 vectors, each at its own recommended layer",
        "plugin",
    ),
    Scenario(
        "ops",
        "5c",
        "ablate / cap / conditional",
        "every request one of: ablation of a vector, a cap of its projection, or an add term with a "
        "condition on another vector's projection at the last prompt token (each its own vector and layer)",
        "plugin",
    ),
    Scenario(
        "policy_monitor3",
        "5d",
        "policy: monitor 3, all traffic",
        "a server policy (PUT /v1/persona/policy) monitors 3 vectors on every request; the requests "
        "themselves carry no persona fields",
        "plugin",
    ),
    Scenario(
        "hf_same",
        "6a",
        "HF hook, one spec",
        "transformers generate + forward hook adding coeff*v, scenario 3's spec, batch = "
        "concurrency (static batches, left padding, greedy)",
        "hf",
    ),
    Scenario(
        "hf_distinct",
        "6b",
        "HF hook, distinct specs",
        "transformers generate + forward hook with scenario 4's specs: one spec per batch, so "
        "every request is its own batch",
        "hf",
    ),
)
BY_KEY = {s.key: s for s in SCENARIOS}
BASELINE = "plain"
TWIN = "plain_twin"  # scenario 1 on a server of its own
STEERING_OFF = "unsteered_off"  # scenario 2 on a server of its own, without the op
OWN_SERVER = ("plain", TWIN, STEERING_OFF)  # the scenarios that each have a server of their own
PLUGIN_SCENARIOS = tuple(s.key for s in SCENARIOS if s.group == "plugin")
HF_SCENARIOS = tuple(s.key for s in SCENARIOS if s.group == "hf")


def label(key: str) -> str:
    s = BY_KEY[key]
    return f"{s.number} {s.title}"


@dataclass(frozen=True)
class BenchVectors:
    """The vector library the plugin server serves (random directions; see run.make_vectors)."""

    directory: str
    names: tuple[str, ...]
    layers: tuple[int, ...]  # recommended layer of each vector
    num_layers: int
    norms: tuple[float, ...] = field(default=())  # norm at the recommended layer, for the report


SAME_COEFF = -2.0
CHECK_COEFF = 40.0  # sanity check: steering this hard must change a greedy output


def steer_same(vectors: BenchVectors) -> list[dict[str, Any]]:
    return [{"vector": vectors.names[0], "coeff": SAME_COEFF, "layers": [vectors.layers[0]], "positions": "response"}]


def steer_distinct(i: int, vectors: BenchVectors) -> list[dict[str, Any]]:
    """Request `i`'s own spec: no two requests of a level share one."""
    n, layers = len(vectors.names), vectors.num_layers
    sign = -1.0 if i % 2 == 0 else 1.0
    coeff = round(sign * (0.5 + 0.01 * i + 0.25 * (i % 12)), 4)
    terms = [
        {"vector": vectors.names[i % n], "coeff": coeff, "layers": [1 + (3 * i) % layers], "positions": "response"}
    ]
    if i % 3 == 0:
        terms.append(
            {
                "vector": vectors.names[(i + 1) % n],
                "coeff": round(0.5 + 0.1 * (i % 7), 4),
                "layers": [1 + (3 * i + layers // 2) % layers],
                "positions": "all",
            }
        )
    return terms


def monitor(vectors: BenchVectors, count: int) -> dict[str, Any]:
    return {"vectors": list(vectors.names[:count])}


def ops(i: int, vectors: BenchVectors) -> list[dict[str, Any]]:
    """Request `i`'s term for scenario 5c: the three data-dependent ops in turn."""
    n, layers = len(vectors.names), vectors.num_layers
    name, layer = vectors.names[i % n], 1 + (3 * i) % layers
    kind = i % 3
    if kind == 0:
        return [{"vector": name, "op": "ablate", "layers": [layer], "positions": "all"}]
    if kind == 1:
        return [{"vector": name, "op": "cap", "max": 0.0, "layers": [layer]}]
    gate = {"vector": vectors.names[(i + 1) % n], "layer": max(1, layer - 1), "above": 0.0}
    return [{"vector": name, "coeff": 1.0, "layers": [layer], "when": gate}]


def policy_document(vectors: BenchVectors) -> str:
    """The policy scenario 5d puts in force: monitor 3 vectors on all traffic."""
    return "monitor: {vectors: [" + ", ".join(vectors.names[:3]) + "]}\n"


def persona_fields(key: str, i: int, vectors: BenchVectors | None) -> dict[str, Any]:
    """The persona fields request `i` of scenario `key` sends (empty for 1, 2 and HF)."""
    if vectors is None:
        return {}
    if key == "steer_same":
        return {"persona_steer": steer_same(vectors)}
    if key == "steer_distinct":
        return {"persona_steer": steer_distinct(i, vectors)}
    if key == "monitor1":
        return {"persona_monitor": monitor(vectors, 1)}
    if key == "monitor3":
        return {"persona_monitor": monitor(vectors, 3)}
    if key == "ops":
        return {"persona_steer": ops(i, vectors)}
    return {}


def hf_terms(key: str, i: int, vectors: BenchVectors) -> list[dict[str, Any]]:
    """The steering terms the HF reference applies to request `i` of HF scenario `key`."""
    if key == "hf_same":
        return steer_same(vectors)
    if key == "hf_distinct":
        return steer_distinct(i, vectors)
    raise KeyError(key)
