"""The persona term language: steering terms (`add`, `ablate`, `cap`, with an optional condition)
and monitoring terms, their limits and errors, and the parsers of their raw (JSON) form.

Every error is a `PersonaSpecError` naming the offending field (`persona_steer[0].coeff`), with a
reason from a fixed set (the label values of the rejection counter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from personavec_vllm import config
from personavec_vllm.library import VectorLibrary
from personavec_vllm.vectors import PersonaVector

Positions = Literal["all", "prompt", "response"]
POSITIONS: tuple[str, ...] = ("all", "prompt", "response")

# Fixed set of rejection reasons: the only label values of the rejection counter.
REJECT_REASONS = (
    "unknown_vector",
    "layer_out_of_range",
    "bad_coeff",
    "bad_positions",
    "too_many_vectors",
    "bad_type",
    "unsupported",
    "internal_field",
    "bad_op",
    "bad_threshold",
)


@dataclass(frozen=True)
class Limits:
    """Operator bounds on what one request may ask for."""

    max_abs_coeff: float = float(config.DEFAULTS[config.MAX_COEFF])
    max_vectors: int = int(config.DEFAULTS[config.MAX_VECTORS])

    @classmethod
    def from_env(cls) -> Limits:
        return cls(
            max_abs_coeff=config.get_float(config.MAX_COEFF),
            max_vectors=config.get_int(config.MAX_VECTORS),
        )


class PersonaSpecError(ValueError):
    """Bad persona input. `field` names the offending request field (e.g. `persona_steer[0].coeff`)."""

    def __init__(self, field: str, reason: str, message: str):
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = reason


Op = Literal["add", "ablate", "cap"]
OPS: tuple[str, ...] = ("add", "ablate", "cap")


@dataclass(frozen=True)
class Gate:
    """A condition on the request: its projection at the last prompt token, on `vector` after
    decoder layer `layer - 1`, is above (`above=True`) or below `threshold` (raw units)."""

    vector: str
    layer: int
    threshold: float
    above: bool

    def to_dict(self) -> dict[str, Any]:
        return {"vector": self.vector, "layer": self.layer, "above" if self.above else "below": self.threshold}


@dataclass(frozen=True)
class SteerTerm:
    """One operation on the residual stream after each of `layers`, at `positions`:

    - `add`: `h <- h + coeff * v`;
    - `ablate`: `h <- h - (h . u) u` with `u = v / |v|` (the projection becomes 0);
    - `cap`: `h <- h + (clip(h . u, low, high) - h . u) u` (activation capping).

    With `when`, the term applies only to requests whose gate holds."""

    vector: str
    coeff: float
    layers: tuple[int, ...]
    positions: Positions = "response"
    op: Op = "add"
    low: float | None = None
    high: float | None = None
    when: Gate | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "vector": self.vector,
            "op": self.op,
            "layers": list(self.layers),
            "positions": self.positions,
        }
        if self.op == "add":
            out["coeff"] = self.coeff
        if self.op == "cap":
            out.update({k: v for k, v in (("min", self.low), ("max", self.high)) if v is not None})
        if self.when is not None:
            out["when"] = self.when.to_dict()
        return out

    @classmethod
    def from_dict(cls, t: dict[str, Any]) -> SteerTerm:
        when = t.get("when")
        gate = None
        if when is not None:
            above = "above" in when
            gate = Gate(str(when["vector"]), int(when["layer"]), float(when["above" if above else "below"]), above)
        op = t.get("op", "add")
        low, high = t.get("min"), t.get("max")
        if op == "ablate":
            low = high = 0.0
        return cls(
            str(t["vector"]),
            float(t.get("coeff", 0.0)),
            tuple(int(x) for x in t["layers"]),
            t["positions"],
            op,
            None if low is None else float(low),
            None if high is None else float(high),
            gate,
        )


@dataclass(frozen=True)
class MonitorTerm:
    """Report `h . v / |v|` of the residual stream after each of `layers`."""

    vector: str
    layers: tuple[int, ...]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_layers(value: Any, field: str, num_layers: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise PersonaSpecError(field, "bad_type", "must be a non-empty list of layer numbers")
    layers = []
    for i, layer in enumerate(value):
        if not _is_int(layer):
            raise PersonaSpecError(f"{field}[{i}]", "bad_type", f"must be an integer, got {_short(layer)}")
        if not 1 <= layer <= num_layers:
            raise PersonaSpecError(
                f"{field}[{i}]",
                "layer_out_of_range",
                f"layer {_short(layer)} is out of range: this model has layers 1..{num_layers} "
                f"(layer L = residual stream after decoder layer L-1)",
            )
        layers.append(layer)
    if len(set(layers)) != len(layers):
        raise PersonaSpecError(field, "bad_type", "lists a layer twice")
    return tuple(layers)


def _short(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut short: error messages never echo a huge client value."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**50 else "a very large integer"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key(name: Any) -> str:
    """A client-chosen field name, safe to put in an error (bounded length)."""
    text = str(name)
    return text if len(text) <= 64 else text[:61] + "..."


def _lookup(library: VectorLibrary, name: Any, field: str, resolved: dict[str, PersonaVector]) -> PersonaVector:
    """The vector `name` names; the first lookup of a name pins its version for the request."""
    if not isinstance(name, str):
        raise PersonaSpecError(field, "bad_type", f"must be a vector name (string), got {_short(name)}")
    vector = resolved.get(name) or library.get(name)
    if vector is None:
        known = ", ".join(library.names()) or "none loaded"
        raise PersonaSpecError(field, "unknown_vector", f"unknown vector {_short(name)} (available: {known})")
    resolved.setdefault(name, vector)
    return vector


TERM_FIELDS = ("vector", "op", "coeff", "layers", "positions", "min", "max", "when")


def _number(value: Any, field: str, reason: str) -> float:
    """A finite float from a JSON number (not a bool), naming the field otherwise (`bad_type` for
    a non-number, `reason` for a number out of range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PersonaSpecError(field, "bad_type", f"must be a number, got {_short(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        raise PersonaSpecError(field, reason, "is too large") from None
    if not math.isfinite(number):
        raise PersonaSpecError(field, reason, "must be finite")
    return number


def _threshold(value: Any, field: str, vector: PersonaVector, layer: int) -> float:
    """A projection value: raw (a number), or `{"sd": k}`: the plain replies' mean at `layer` plus
    `k` standard deviations (statistics stored with the vector at extraction)."""
    if isinstance(value, dict):
        if set(value) != {"sd"}:
            raise PersonaSpecError(field, "bad_threshold", 'must be a number or {"sd": k}')
        k = _number(value["sd"], f"{field}.sd", "bad_threshold")
        plain = vector.plain_stats(layer)
        if plain is None:
            raise PersonaSpecError(
                field,
                "bad_threshold",
                f"vector {vector.name!r} has no plain-reply statistics at layer {layer}; give a raw value",
            )
        return float(plain["mean"]) + k * float(plain["std"])
    return _number(value, field, "bad_threshold")


def _coefficient(value: dict[str, Any], field: str, vector: PersonaVector, layer: int) -> float:
    """The raw coefficient of `{"norm": x}` (add a push of norm `x`: comparable across layers,
    whose vector norms differ several-fold) or `{"sd": k}` (a push of `k` standard deviations of
    the plain replies' projection at `layer`, statistics stored with the vector)."""
    if len(value) != 1 or next(iter(value)) not in ("norm", "sd"):
        raise PersonaSpecError(field, "bad_coeff", 'must be a number, {"norm": x} or {"sd": k}')
    unit = next(iter(value))
    amount = _number(value[unit], f"{field}.{unit}", "bad_coeff")
    norm = float(vector.vectors[layer].norm())
    if norm == 0:
        raise PersonaSpecError(field, "bad_coeff", f"vector {vector.name!r} is zero at layer {layer}")
    if unit == "norm":
        return amount / norm
    plain = vector.plain_stats(layer)
    if plain is None:
        raise PersonaSpecError(
            field,
            "bad_coeff",
            f"vector {vector.name!r} has no plain-reply statistics at layer {layer}; give a raw value",
        )
    return amount * float(plain["std"]) / norm


def _parse_gate(raw: Any, field: str, library: VectorLibrary, resolved: dict[str, PersonaVector]) -> Gate:
    if not isinstance(raw, dict):
        raise PersonaSpecError(field, "bad_type", "must be an object {vector, layer, above | below}")
    unknown = set(raw) - {"vector", "layer", "above", "below"}
    if unknown:
        raise PersonaSpecError(f"{field}.{_key(sorted(map(str, unknown))[0])}", "bad_type", "unknown field")
    vector = _lookup(library, raw.get("vector"), f"{field}.vector", resolved)
    layer = raw.get("layer", vector.layer)
    layer = _parse_layers([layer], f"{field}.layer", library.num_layers)[0] if "layer" in raw else vector.layer
    sides = [side for side in ("above", "below") if side in raw]
    if len(sides) != 1:
        raise PersonaSpecError(field, "bad_threshold", "needs exactly one of above, below")
    side = sides[0]
    return Gate(vector.name, layer, _threshold(raw[side], f"{field}.{side}", vector, layer), side == "above")


def _parse_term(
    item: Any, f: str, library: VectorLibrary, limits: Limits, resolved: dict[str, PersonaVector]
) -> list[SteerTerm]:
    """One steering term; a cap in standard-deviation units becomes one term per layer (the units
    differ per layer)."""
    if not isinstance(item, dict):
        raise PersonaSpecError(f, "bad_type", "must be an object {vector, op, coeff, layers, positions, ...}")
    unknown = set(item) - set(TERM_FIELDS)
    if unknown:
        raise PersonaSpecError(f"{f}.{_key(sorted(map(str, unknown))[0])}", "bad_type", "unknown field")
    vector = _lookup(library, item.get("vector"), f"{f}.vector", resolved)
    op = item.get("op", "add")
    if op not in OPS:
        raise PersonaSpecError(f"{f}.op", "bad_op", f"must be one of {', '.join(OPS)}; got {_short(op)}")
    for name, allowed in (("coeff", op == "add"), ("min", op == "cap"), ("max", op == "cap")):
        if name in item and not allowed:
            raise PersonaSpecError(f"{f}.{name}", "bad_op", f"is not used by op {op!r}")
    if op == "cap" and item.get("min") is None and item.get("max") is None:
        raise PersonaSpecError(f, "bad_threshold", "op 'cap' needs min, max or both")
    layers = item.get("layers")
    layers = (vector.layer,) if layers is None else _parse_layers(layers, f"{f}.layers", library.num_layers)
    # raw coefficients per layer group; a coefficient in norm or sd units differs per layer
    coeffs: dict[tuple[int, ...], float] = {layers: 0.0}
    if op == "add":
        raw = item.get("coeff")
        if isinstance(raw, dict):
            coeffs = {(layer,): _coefficient(raw, f"{f}.coeff", vector, layer) for layer in layers}
        else:
            coeffs = {layers: _number(raw, f"{f}.coeff", "bad_coeff")}
        for coeff in coeffs.values():
            if abs(coeff) > limits.max_abs_coeff:
                raise PersonaSpecError(
                    f"{f}.coeff",
                    "bad_coeff",
                    f"|coeff| = {abs(coeff):g} (raw units) exceeds the limit {limits.max_abs_coeff:g}",
                )
    positions = item.get("positions", "response")
    if positions not in POSITIONS:
        raise PersonaSpecError(
            f"{f}.positions", "bad_positions", f"must be one of {', '.join(POSITIONS)}; got {_short(positions)}"
        )
    gate = _parse_gate(item["when"], f"{f}.when", library, resolved) if item.get("when") is not None else None
    if op != "cap":
        low = high = 0.0 if op == "ablate" else None
        return [SteerTerm(vector.name, coeff, group, positions, op, low, high, gate) for group, coeff in coeffs.items()]
    per_layer = any(isinstance(item.get(b), dict) for b in ("min", "max"))
    groups = [(layer,) for layer in layers] if per_layer else [layers]
    terms = []
    for group in groups:
        low = None if item.get("min") is None else _threshold(item["min"], f"{f}.min", vector, group[0])
        high = None if item.get("max") is None else _threshold(item["max"], f"{f}.max", vector, group[0])
        if low is not None and high is not None and low > high:
            raise PersonaSpecError(f"{f}.min", "bad_threshold", f"min ({low:g}) is above max ({high:g})")
        terms.append(SteerTerm(vector.name, 0.0, group, positions, "cap", low, high, gate))
    return terms


def parse_steer(
    raw: Any, library: VectorLibrary, limits: Limits, resolved: dict[str, PersonaVector]
) -> tuple[SteerTerm, ...]:
    field = "persona_steer"
    if raw is None:
        return ()
    single = isinstance(raw, dict)  # one term may be given without the list
    if single:
        raw = [raw]
    if not isinstance(raw, list):
        raise PersonaSpecError(field, "bad_type", "must be a list of {vector, op, coeff, layers, positions, ...}")
    if len(raw) > limits.max_vectors:
        raise PersonaSpecError(field, "too_many_vectors", f"{len(raw)} terms; at most {limits.max_vectors} per request")
    terms: list[SteerTerm] = []
    for i, item in enumerate(raw):
        terms.extend(_parse_term(item, field if single else f"{field}[{i}]", library, limits, resolved))
    check_gates(terms, field)
    return tuple(terms)


def check_gates(terms: list[SteerTerm], field: str) -> None:
    """Terms on the same vector and layer must share their condition (the tables hold one gate per
    vector, layer and token of a request), and their caps must overlap (caps on one vector and
    layer apply together: the projection is kept in the intersection of their ranges)."""
    gates: dict[tuple[str, int], Gate | None] = {}
    ranges: dict[tuple[str, int], tuple[float, float]] = {}
    for term in terms:
        for layer in term.layers:
            key = (term.vector, layer)
            if key in gates and gates[key] != term.when:
                raise PersonaSpecError(
                    field, "bad_op", f"two terms on {term.vector!r} at layer {layer} have different conditions (when)"
                )
            gates[key] = term.when
            if term.op != "add":
                lo, hi = ranges.get(key, (-math.inf, math.inf))
                lo = max(lo, -math.inf if term.low is None else term.low)
                hi = min(hi, math.inf if term.high is None else term.high)
                if lo > hi:
                    raise PersonaSpecError(
                        field,
                        "bad_threshold",
                        f"the caps on {term.vector!r} at layer {layer} leave no value ({lo:g} > {hi:g})",
                    )
                ranges[key] = (lo, hi)


def parse_monitor(
    raw: Any, library: VectorLibrary, limits: Limits, resolved: dict[str, PersonaVector]
) -> tuple[tuple[MonitorTerm, ...], bool]:
    field = "persona_monitor"
    if raw is None or raw is False:  # identity: 0 and [] are not "off", they are errors
        return (), False
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise PersonaSpecError(field, "bad_type", "must be true or an object {vectors, layers, per_token}")
    unknown = set(raw) - {"vectors", "layers", "per_token"}
    if unknown:
        raise PersonaSpecError(f"{field}.{_key(sorted(map(str, unknown))[0])}", "bad_type", "unknown field")
    names = raw.get("vectors")
    if names is None:
        names = library.names()
        if not names:
            raise PersonaSpecError(field, "unknown_vector", "no vectors are loaded to monitor")
    elif not isinstance(names, list) or not names:
        raise PersonaSpecError(f"{field}.vectors", "bad_type", "must be a non-empty list of vector names")
    if raw.get("vectors") is not None and len(names) > limits.max_vectors:
        raise PersonaSpecError(
            f"{field}.vectors", "too_many_vectors", f"{len(names)} vectors; at most {limits.max_vectors}"
        )
    if len(set(map(str, names))) != len(names):
        raise PersonaSpecError(f"{field}.vectors", "bad_type", "lists a vector twice")
    layers = raw.get("layers")
    if layers is not None:
        layers = _parse_layers(layers, f"{field}.layers", library.num_layers)
    per_token = raw.get("per_token", False)
    if not isinstance(per_token, bool):
        raise PersonaSpecError(f"{field}.per_token", "bad_type", f"must be true or false, got {_short(per_token)}")
    terms = []
    for i, name in enumerate(names):
        vector = _lookup(library, name, f"{field}.vectors[{i}]", resolved)
        terms.append(MonitorTerm(vector.name, layers or (vector.monitor_layer,)))
    return tuple(terms), per_token
