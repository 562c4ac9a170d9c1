"""Fast unit tests: the vector file format, request spec validation, steering tables."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from personavec_vllm.spec import Limits, PersonaSpec, PersonaSpecError, parse_extra_args, parse_spec
from personavec_vllm.steering.tables import SteeringTables
from personavec_vllm.vectors import (
    PersonaVector,
    VectorFileError,
    VectorLibrary,
    load_vector,
    save_vector,
)

L, H = 4, 16


def _vector(name="evil", layer=2, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    return PersonaVector(name=name, vectors=torch.randn(L + 1, H, generator=gen), trait=name,
                         model="tiny", layer=layer, description="d", **kw)


@pytest.fixture
def library(tmp_path):
    for i, name in enumerate(["evil", "kind"]):
        save_vector(_vector(name, seed=i), tmp_path / f"{name}.safetensors")
    return VectorLibrary(tmp_path, L, H)


# ---- vector files -----------------------------------------------------------------------

def test_vector_file_round_trip(tmp_path):
    v = _vector(extra={"stats": json.dumps({"pos_mean": 1.5})})
    path = save_vector(v, tmp_path / "evil.safetensors")
    back = load_vector(path)
    assert torch.equal(back.vectors, v.vectors)
    assert (back.trait, back.model, back.layer, back.method) == ("evil", "tiny", 2, "response_avg_diff")
    assert back.stats() == {"pos_mean": 1.5}
    assert back.norms() == pytest.approx(v.vectors.norm(dim=1).tolist())


def test_vector_file_metadata_is_the_public_contract(tmp_path):
    from safetensors import safe_open

    save_vector(_vector(), tmp_path / "evil.safetensors")
    with safe_open(str(tmp_path / "evil.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert list(f.keys()) == ["persona_vector"]
        assert f.get_tensor("persona_vector").dtype == torch.float32
    assert meta["hidden_size"] == str(H) and meta["num_layers"] == str(L) and meta["layer"] == "2"
    for key in ("trait", "model", "method", "description"):
        assert key in meta


def test_bad_vector_files_are_refused(tmp_path):
    save_file({"persona_vector": torch.zeros(L + 1, H)}, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(VectorFileError, match="missing"):
        load_vector(tmp_path / "nometa.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a file")
    with pytest.raises(VectorFileError, match="not a readable"):
        load_vector(tmp_path / "garbage.safetensors")
    with pytest.raises(VectorFileError, match="non-finite"):
        PersonaVector("x", torch.full((L + 1, H), math.nan), "x", "m", 1)
    with pytest.raises(VectorFileError, match="layer"):
        _vector(layer=0)


def test_library_refuses_vectors_of_another_shape(tmp_path):
    save_vector(_vector(), tmp_path / "evil.safetensors")
    with pytest.raises(VectorFileError, match=r"\[5, 16\].*needs \[7, 16\]"):
        VectorLibrary(tmp_path, 6, H)


def test_library_picks_up_new_files(library, tmp_path):
    assert library.names() == ["evil", "kind"]
    assert library.get("new") is None
    save_vector(_vector("new", seed=5), tmp_path / "new.safetensors")
    assert library.get("new") is not None  # a miss re-reads the directory
    (tmp_path / "kind.safetensors").unlink()
    library.refresh()
    assert library.names() == ["evil", "new"]


# ---- request specs ------------------------------------------------------------------------

def test_defaults_are_resolved(library):
    spec = parse_spec([{"vector": "evil", "coeff": -1.5}], True, library, request_key="k")
    assert spec.steer[0].layers == (2,) and spec.steer[0].positions == "response"
    assert {(t.vector, t.layers) for t in spec.monitor} == {("evil", (2,)), ("kind", (2,))}
    assert PersonaSpec.from_dict(spec.to_dict()) == spec


def test_cache_salt_depends_on_steering_only(library):
    a = parse_spec([{"vector": "evil", "coeff": 1.0}], None, library)
    b = parse_spec([{"vector": "evil", "coeff": 1.0}], {"vectors": ["kind"]}, library)
    c = parse_spec([{"vector": "evil", "coeff": 2.0}], None, library)
    assert a.cache_salt() == b.cache_salt() != c.cache_salt()
    assert parse_spec(None, True, library).cache_salt() is None


@pytest.mark.parametrize(
    "steer, monitor, field, reason",
    [
        ([{"vector": "nope", "coeff": 1}], None, "persona_steer[0].vector", "unknown_vector"),
        ([{"vector": 3, "coeff": 1}], None, "persona_steer[0].vector", "bad_type"),
        ([{"vector": "evil", "coeff": 1, "layers": [5]}], None, "persona_steer[0].layers[0]", "layer_out_of_range"),
        ([{"vector": "evil", "coeff": 1, "layers": [0]}], None, "persona_steer[0].layers[0]", "layer_out_of_range"),
        ([{"vector": "evil", "coeff": 1, "layers": ["2"]}], None, "persona_steer[0].layers[0]", "bad_type"),
        ([{"vector": "evil", "coeff": 1, "layers": []}], None, "persona_steer[0].layers", "bad_type"),
        ([{"vector": "evil", "coeff": math.inf}], None, "persona_steer[0].coeff", "bad_coeff"),
        ([{"vector": "evil", "coeff": 1e6}], None, "persona_steer[0].coeff", "bad_coeff"),
        ([{"vector": "evil", "coeff": "1"}], None, "persona_steer[0].coeff", "bad_type"),
        ([{"vector": "evil", "coeff": True}], None, "persona_steer[0].coeff", "bad_type"),
        ([{"vector": "evil"}], None, "persona_steer[0].coeff", "bad_type"),
        ([{"vector": "evil", "coeff": 1, "positions": "end"}], None, "persona_steer[0].positions", "bad_positions"),
        ([{"vector": "evil", "coeff": 1, "weight": 2}], None, "persona_steer[0].weight", "bad_type"),
        ([{"vector": "evil", "coeff": 1}] * 3, None, "persona_steer", "too_many_vectors"),
        ("evil", None, "persona_steer", "bad_type"),
        (None, {"vectors": ["nope"]}, "persona_monitor.vectors[0]", "unknown_vector"),
        (None, {"vectors": "evil"}, "persona_monitor.vectors", "bad_type"),
        (None, {"layers": [7]}, "persona_monitor.layers[0]", "layer_out_of_range"),
        (None, {"per_token": "yes"}, "persona_monitor.per_token", "bad_type"),
        (None, {"vector": ["evil"]}, "persona_monitor.vector", "bad_type"),
        (None, 5, "persona_monitor", "bad_type"),
    ],
)
def test_bad_input_names_the_field(library, steer, monitor, field, reason):
    with pytest.raises(PersonaSpecError) as info:
        parse_spec(steer, monitor, library, Limits(max_abs_coeff=10, max_vectors=2))
    assert info.value.field == field and info.value.reason == reason
    assert str(info.value).startswith(field)


def test_extra_args_envelope(library):
    assert parse_extra_args({"other": 1}, library) is None
    spec = parse_extra_args({"personavec": {"persona_monitor": True}}, library, default_key="req-1")
    assert spec.request_key == "req-1"
    with pytest.raises(PersonaSpecError, match="persona_stear"):
        parse_extra_args({"personavec": {"persona_stear": []}}, library)


# ---- steering tables ------------------------------------------------------------------------

def test_tables_rows_and_phases(library):
    tables = SteeringTables(library, max_tokens=32, max_slots=2, max_columns=4, device="cpu", dtype=torch.float32)
    spec = parse_spec(
        [{"vector": "evil", "coeff": 2.0, "layers": [1], "positions": "prompt"},
         {"vector": "kind", "coeff": -1.0, "layers": [1, 3], "positions": "response"}],
        None, library,
    )
    state = tables.admit("r1", spec, {"r1"})
    assert state.slot == 0 and state.steer_layers == {1, 3}
    evil, kind = tables.columns["evil"], tables.columns["kind"]
    # rows 1..3 = phases prompt / last prompt / generated of slot 0
    assert tables.coef[1, 1:4, evil].tolist() == [2.0, 2.0, 0.0]
    assert tables.coef[1, 1:4, kind].tolist() == [0.0, -1.0, -1.0]
    assert tables.coef[3, 1:4, kind].tolist() == [0.0, -1.0, -1.0]
    assert tables.coef[2].abs().sum() == 0 and tables.coef[:, 0].abs().sum() == 0
    # a plain request (3 tokens) then r1's chunk covering positions 3..7 of a 6-token prompt
    tables.set_token_rows([(3, 5, 3, 6, 0)], 8)
    assert tables.token_row[:10].tolist() == [0, 0, 0, 1, 1, 2, 3, 3, 0, 0]
    tables.set_token_rows([], 8)  # a batch without steering reads row 0 everywhere
    assert tables.token_row.abs().sum() == 0
    tables.release("r1")
    assert tables.coef.abs().sum() == 0


def test_tables_reclaim_slots_of_requests_outside_the_batch(library):
    tables = SteeringTables(library, max_tokens=8, max_slots=1, max_columns=4, device="cpu", dtype=torch.float32)
    spec = parse_spec([{"vector": "evil", "coeff": 1.0}], None, library)
    tables.admit("old", spec, {"old"})
    state = tables.admit("new", spec, {"new"})  # "old" was preempted: not in this batch
    assert state.slot == 0 and "old" not in tables.requests
    with pytest.raises(RuntimeError, match="more than 1 steered"):
        tables.admit("third", spec, {"new", "third"})


def test_op_adds_steering_and_projects(library):
    from personavec_vllm.steering import op

    op.register_op()
    tables = SteeringTables(library, max_tokens=8, max_slots=2, max_columns=4, device="cpu", dtype=torch.float32)
    spec = parse_spec([{"vector": "evil", "coeff": 3.0, "layers": [2], "positions": "all"}], None, library)
    tables.admit("r", spec, {"r"})
    tables.set_token_rows([(1, 2, 0, 2, 0)], 4)  # tokens 1 and 2 belong to the steered request
    tables.set_active_layers({2}, {2})
    hidden, residual = torch.randn(4, H), torch.randn(4, H)
    before = residual.clone()
    old, op.TABLES = op.TABLES, tables
    try:
        torch.ops.personavec.steer_and_capture(hidden, residual, 2)
    finally:
        op.TABLES = old
    v = library.get("evil").vectors[2]
    expected = before.clone()
    expected[1:3] += 3.0 * v
    assert torch.allclose(residual, expected)
    unit = v / v.norm()
    assert torch.allclose(tables.proj[2, :4, tables.columns["evil"]], (hidden + expected) @ unit, atol=1e-5)
