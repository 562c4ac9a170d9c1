"""Hypothesis strategies for the persona request fields: mostly well-formed values with every
kind of wrong one mixed in (types, ranges, names, nesting, huge and non-finite numbers)."""

from __future__ import annotations

from hypothesis import strategies as st

POSITIONS = ["all", "prompt", "response"]

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


def vector_name(names):
    return st.one_of(st.sampled_from(names), st.text(max_size=10), json_leaf)


def layer(num_layers):
    return st.one_of(
        st.integers(min_value=1, max_value=num_layers),
        st.integers(min_value=-3, max_value=num_layers + 3),
        st.integers(min_value=10**20, max_value=10**400),
        json_leaf,
    )


def coeff():
    return st.one_of(
        st.floats(min_value=-12, max_value=12),
        st.integers(min_value=-60, max_value=60),
        st.integers(min_value=10**300, max_value=10**400),
        st.floats(),
        json_leaf,
    )


def steer_coeff():
    """A coefficient as `persona_steer` takes it: raw, or in norm / sd units (and malformed)."""
    return st.one_of(
        coeff(),
        st.fixed_dictionaries({"norm": coeff()}),
        st.fixed_dictionaries({"sd": coeff()}),
        st.dictionaries(st.sampled_from(["norm", "sd", "raw", ""]), json_leaf, max_size=2),
    )


def threshold():
    return st.one_of(
        st.floats(min_value=-20, max_value=20),
        st.fixed_dictionaries({"sd": coeff()}),
        st.dictionaries(st.text(max_size=4), json_leaf, max_size=2),
        json_leaf,
    )


def gate(names, num_layers):
    return st.one_of(
        st.fixed_dictionaries(
            {"vector": vector_name(names)},
            optional={"layer": layer(num_layers), "above": threshold(), "below": threshold()},
        ),
        json_value,
    )


def steer_term(names, num_layers):
    fields = {
        "vector": vector_name(names),
        "coeff": steer_coeff(),
        "layers": st.one_of(st.none(), st.lists(layer(num_layers), max_size=4), json_leaf),
        "positions": st.one_of(st.sampled_from(POSITIONS), json_leaf),
    }
    ops = {
        "op": st.one_of(st.sampled_from(["add", "ablate", "cap"]), json_leaf),
        "min": threshold(),
        "max": threshold(),
        "when": gate(names, num_layers),
    }
    return st.one_of(
        st.fixed_dictionaries(
            {"vector": fields["vector"], "coeff": fields["coeff"]},
            optional={"layers": fields["layers"], "positions": fields["positions"], "when": ops["when"]},
        ),
        st.fixed_dictionaries(
            {"vector": fields["vector"], "op": st.sampled_from(["ablate", "cap"])},
            optional={
                "layers": fields["layers"],
                "positions": fields["positions"],
                "min": ops["min"],
                "max": ops["max"],
                "when": ops["when"],
            },
        ),
        st.fixed_dictionaries({}, optional={**fields, **ops, "weight": json_leaf}),
        json_value,
    )


def persona_steer(names, num_layers):
    return st.one_of(
        st.none(), st.lists(steer_term(names, num_layers), max_size=4), steer_term(names, num_layers), json_value
    )


def persona_monitor(names, num_layers):
    monitor_object = st.fixed_dictionaries(
        {},
        optional={
            "vectors": st.one_of(st.lists(vector_name(names), max_size=4), json_leaf),
            "layers": st.one_of(st.lists(layer(num_layers), max_size=4), json_leaf),
            "per_token": st.one_of(st.booleans(), json_leaf),
        },
    )
    return st.one_of(st.none(), st.booleans(), monitor_object, json_value)


def persona_fields(names, num_layers):
    """A dict of request fields: the two persona fields, sometimes misspelt or joined by
    reserved `vllm_xargs` keys."""
    return st.fixed_dictionaries(
        {},
        optional={
            "persona_steer": persona_steer(names, num_layers),
            "persona_monitor": persona_monitor(names, num_layers),
            "Persona_steer": json_value,
            "vllm_xargs": st.one_of(
                st.dictionaries(
                    st.sampled_from(["personavec", "personavec_resolved", "personavec_ticket", "other"]),
                    st.text(max_size=20),
                    max_size=2,
                ),
                json_leaf,
            ),
        },
    )
