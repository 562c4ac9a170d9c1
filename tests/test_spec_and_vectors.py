"""Fast unit tests: the vector file format, request spec validation, steering tables."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import save_file

from personavec_vllm.engine.tables import SteeringTables, TokenSpan
from personavec_vllm.library import VectorLibrary
from personavec_vllm.spec import Limits, PersonaSpec, PersonaSpecError, parse_extra_args, parse_spec
from personavec_vllm.vectors import PersonaVector, VectorFileError, load_vector, save_vector

L, H = 4, 16


def _vector(name="evil", layer=2, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    return PersonaVector(
        name=name,
        vectors=torch.randn(L + 1, H, generator=gen),
        trait=name,
        model="tiny",
        layer=layer,
        description="d",
        **kw,
    )


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
    with pytest.raises(VectorFileError, match="not a (readable )?safetensors file"):
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
    assert library.refresh().added == ("new",)
    assert library.get("new") is not None
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
        [
            {"vector": "evil", "coeff": 2.0, "layers": [1], "positions": "prompt"},
            {"vector": "kind", "coeff": -1.0, "layers": [1, 3], "positions": "response"},
        ],
        None,
        library,
    )
    state = tables.admit("r1", spec, {"r1"})
    assert state.slot == 0 and state.steer_layers == {1, 3}
    evil, kind = (tables.column_of(n, library.version(n)) for n in ("evil", "kind"))
    # rows 1..3 = phases prompt / last prompt / generated of slot 0
    assert tables.coef[1, 1:4, evil].tolist() == [2.0, 2.0, 0.0]
    assert tables.coef[1, 1:4, kind].tolist() == [0.0, -1.0, -1.0]
    assert tables.coef[3, 1:4, kind].tolist() == [0.0, -1.0, -1.0]
    assert tables.coef[2].abs().sum() == 0 and tables.coef[:, 0].abs().sum() == 0
    # a plain request (3 tokens) then r1's chunk covering positions 3..7 of a 6-token prompt
    tables.set_token_rows([(TokenSpan(start=3, count=5, first=3, num_prompt=6), 0)], 8)
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
    from personavec_vllm.engine import op

    op.register_op()
    tables = SteeringTables(library, max_tokens=8, max_slots=2, max_columns=4, device="cpu", dtype=torch.float32)
    spec = parse_spec([{"vector": "evil", "coeff": 3.0, "layers": [2], "positions": "all"}], None, library)
    tables.admit("r", spec, {"r"})
    tables.set_token_rows([(TokenSpan(1, 2, 0, 2), 0)], 4)  # tokens 1 and 2 belong to the steered request
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
    assert torch.allclose(
        tables.proj[2, :4, tables.column_of("evil", library.version("evil"))], (hidden + expected) @ unit, atol=1e-5
    )


# ---- hardening: what a vector file, a spec or the tables must refuse ------------------------


def _file_bytes(values=None, **metadata):
    from safetensors.torch import save

    values = torch.randn(L + 1, H) if values is None else values
    meta = {
        "trait": "t",
        "model": "m",
        "hidden_size": str(H),
        "num_layers": str(L),
        "layer": "2",
        "method": "response_avg_diff",
        "description": "d",
        **metadata,
    }
    return save({"persona_vector": values}, metadata=meta)


@pytest.mark.parametrize(
    "data, match",
    [
        (lambda: _file_bytes(torch.full((L + 1, H), 1e38)), "norm"),
        (lambda: _file_bytes(stats="{oops"), "stats"),
        (lambda: _file_bytes(stats=json.dumps({"projection": {"2": {"pos_mean": 1}}})), "stats"),
        (
            lambda: _file_bytes(
                stats=json.dumps({"projection": {"9": {"pos_mean": 1, "pos_std": 1, "neg_mean": 0, "neg_std": 1}}})
            ),
            "layer 9",
        ),
        (lambda: _file_bytes(stats=json.dumps({"plain": {"2": {"mean": 1, "std": -1}}})), "stats"),
        (lambda: _file_bytes(padding="x" * (2 << 20)), "header is"),
        (lambda: b"\x07" + b"\0" * 7 + b"[1,2,3]", "not a JSON object"),
        (lambda: b"\x04" + b"\0" * 7 + b"{}", "past the end"),
        (lambda: b"abc", "shorter"),
        (lambda: _file_bytes(layer="x"), "integers"),
    ],
)
def test_parse_vector_refuses_what_would_break_a_server(data, match):
    from personavec_vllm.vectors import parse_vector

    with pytest.raises(VectorFileError, match=match):
        parse_vector(data(), "x")


@pytest.mark.parametrize(
    "name, ok",
    [
        ("evil", True),
        ("a.b-c_d", True),
        ("abc\n", False),
        (".hidden", False),
        ("..", False),
        ("a..b", False),
        ("a/b", False),
        ("x" * 65, False),
        ("", False),
    ],
)
def test_vector_names_are_matched_in_full(name, ok):
    from personavec_vllm.vectors import is_valid_name

    assert is_valid_name(name) is ok


def test_library_leaves_out_files_that_break_later(library, tmp_path, caplog):
    (tmp_path / "broken.safetensors").write_bytes(_file_bytes(stats="{oops"))
    change = library.refresh()
    assert change.added == () and "broken" in library.problems and library.names() == ["evil", "kind"]
    (tmp_path / "evil.safetensors").write_bytes(b"garbage")  # a good file turns bad: it is dropped
    assert library.refresh().changed == ("evil",) and library.names() == ["kind"]
    with pytest.raises(VectorFileError):  # at start-up a broken file stops the start
        VectorLibrary(tmp_path, L, H)


def test_library_install_validates_before_writing_and_caps_the_count(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONAVEC_CACHE_DIR", str(tmp_path / "cache"))
    from personavec_vllm.library import LibraryFull

    library = VectorLibrary(tmp_path, L, H, max_vectors=2, keep_versions=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(VectorFileError):
        library.install("bad", _file_bytes(torch.full((L + 1, H), math.inf)))
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    library.install("a", _file_bytes())
    library.install("b", _file_bytes())
    with pytest.raises(LibraryFull, match="at most 2"):
        library.install("c", _file_bytes())
    assert library.names() == ["a", "b"]


def test_library_keeps_versions_that_requests_hold(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONAVEC_CACHE_DIR", str(tmp_path / "cache"))
    owner = VectorLibrary(tmp_path, L, H, keep_versions=True)
    worker = VectorLibrary(tmp_path, L, H)  # another process's view of the same directory
    first = owner.install("v", _file_bytes(torch.ones(L + 1, H)))
    owner.remove("v")
    second = owner.install("v", _file_bytes(torch.full((L + 1, H), 2.0)))
    assert first.version != second.version
    assert worker.vector_at("v", first.version).vectors[1, 0] == 1.0  # replaced, still servable
    assert worker.vector_at("v", second.version).vectors[1, 0] == 2.0
    owner.remove("v")
    assert worker.vector_at("v", second.version) is not None
    worker.refresh()
    assert "v" not in worker.names()
    assert worker.vector_at("v", "0" * 16) is None


def test_spec_refusals_that_used_to_pass_or_crash(library):
    with pytest.raises(PersonaSpecError) as info:
        parse_spec([{"vector": "evil", "coeff": 10**400}], None, library)
    assert info.value.field == "persona_steer[0].coeff" and "too large" in str(info.value)
    for monitor in (0, 1, [], "true"):
        with pytest.raises(PersonaSpecError) as info:
            parse_spec(None, monitor, library)
        assert info.value.field == "persona_monitor"
    with pytest.raises(PersonaSpecError) as info:
        parse_spec({}, None, library)  # one term without the list: its fields are named as such
    assert info.value.field == "persona_steer.vector"
    for bad in (
        "x",
        {"persona_steer": [{"vector": "evil"}]},
        {"persona_steer": [{"coeff": 1, "layers": "x"}]},
        {"persona_monitor": {"vectors": {"evil": [2]}, "per_token": 1}, "vector_versions": 5},
    ):
        with pytest.raises(PersonaSpecError):
            PersonaSpec.from_dict(bad)


def test_cache_salt_depends_on_the_vector_version(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONAVEC_CACHE_DIR", str(tmp_path / "cache"))
    owner = VectorLibrary(tmp_path, L, H, keep_versions=True)
    owner.install("v", _file_bytes(torch.ones(L + 1, H)))
    steer = [{"vector": "v", "coeff": 1.0, "positions": "all"}]
    old = parse_spec(steer, None, owner).cache_salt()
    owner.remove("v")
    owner.install("v", _file_bytes(torch.full((L + 1, H), 2.0)))
    assert parse_spec(steer, None, owner).cache_salt() != old


def test_tables_evict_idle_columns_and_fail_only_when_all_are_held(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONAVEC_CACHE_DIR", str(tmp_path / "cache"))
    from personavec_vllm.engine.tables import TableFull, VectorUnavailable

    owner = VectorLibrary(tmp_path, L, H, keep_versions=True)
    tables = SteeringTables(owner, max_tokens=8, max_slots=4, max_columns=2, device="cpu", dtype=torch.float32)
    for i in range(6):  # more distinct vectors over time than columns: idle ones are evicted
        owner.install(f"v{i}", _file_bytes(torch.full((L + 1, H), float(i + 1))))
        spec = parse_spec([{"vector": f"v{i}", "coeff": 1.0}], None, owner)
        state = tables.admit(f"r{i}", spec, {f"r{i}"})
        col = tables.column_of(f"v{i}", owner.version(f"v{i}"))
        assert tables.lib[2, col, 0] == i + 1 and state.columns == (col,)
        tables.release(f"r{i}")
        owner.remove(f"v{i}")
    assert tables.active_columns <= 2
    owner.install("x", _file_bytes())
    owner.install("y", _file_bytes())
    owner.install("z", _file_bytes())
    tables.admit("hold-x", parse_spec(None, {"vectors": ["x"]}, owner), set())
    tables.admit("hold-y", parse_spec(None, {"vectors": ["y"]}, owner), set())
    with pytest.raises(TableFull):
        tables.admit("z", parse_spec(None, {"vectors": ["z"]}, owner), set())
    assert tables.requests["z"] is None  # recorded as plain; nothing held
    tables.release("hold-x")
    assert tables.admit("z2", parse_spec(None, {"vectors": ["z"]}, owner), set()).monitor
    gone = parse_spec(None, {"vectors": ["y"]}, owner)
    owner.remove("y")
    shutil.rmtree(owner.versions_dir)
    tables.release("hold-y")
    for _ in range(2):  # y's column is evicted by new vectors; y's version is gone everywhere
        tables.column(f"new{_}", owner.install(f"new{_}", _file_bytes()).version)
    with pytest.raises(VectorUnavailable):
        tables.admit("late", gone, set())


def test_monitoring_layer_is_its_own_metadata_and_the_monitoring_default(tmp_path):
    """`monitor_layer` (issue #16): persona_monitor defaults to it, steering keeps `layer`."""
    save_vector(_vector("evil", layer=2, extra={"monitor_layer": "4"}), tmp_path / "evil.safetensors")
    save_vector(_vector("kind", layer=3, seed=1), tmp_path / "kind.safetensors")
    back = load_vector(tmp_path / "evil.safetensors")
    assert (back.layer, back.monitor_layer) == (2, 4)
    library = VectorLibrary(tmp_path, L, H)
    spec = parse_spec([{"vector": "evil", "coeff": 1.0}], True, library)
    assert spec.steer[0].layers == (2,)
    assert {(t.vector, t.layers) for t in spec.monitor} == {("evil", (4,)), ("kind", (3,))}
    named = parse_spec(None, {"vectors": ["evil"], "layers": [1]}, library)
    assert named.monitor[0].layers == (1,)
    for bad in ("0", "5", "x", "-1", "", "\u00b2", "\u0663", "01x"):  # superscript 2, Arabic-Indic 3: isdigit, not int
        with pytest.raises(VectorFileError, match="monitor_layer"):
            _vector(extra={"monitor_layer": bad})


def test_coefficients_in_norm_and_sd_units_become_raw_per_layer(tmp_path):
    """`coeff: {"norm": x}` pushes by norm x at each layer, `{"sd": k}` by k plain-reply SDs
    (issue #16: raw coefficients are not comparable across layers whose |v| differ)."""
    stats = {"plain": {"1": {"mean": 0.0, "std": 2.0}, "3": {"mean": 1.0, "std": 0.5}}}
    v = _vector("evil", layer=1, extra={"stats": json.dumps(stats)})
    save_vector(v, tmp_path / "evil.safetensors")
    library = VectorLibrary(tmp_path, L, H)
    norms = v.vectors.norm(dim=1)
    spec = parse_spec([{"vector": "evil", "coeff": {"norm": 3.0}, "layers": [1, 3]}], None, library)
    assert [(t.layers, t.coeff) for t in spec.steer] == [
        ((1,), pytest.approx(3.0 / float(norms[1]))),
        ((3,), pytest.approx(3.0 / float(norms[3]))),
    ]
    spec = parse_spec([{"vector": "evil", "coeff": {"sd": -2.0}, "layers": [3]}], None, library)
    assert spec.steer[0].coeff == pytest.approx(-2.0 * 0.5 / float(norms[3]))
    raw = parse_spec([{"vector": "evil", "coeff": 1.5, "layers": [1, 3]}], None, library)
    assert [(t.layers, t.coeff) for t in raw.steer] == [((1, 3), 1.5)]
    for coeff, field in (
        ({"sd": 1.0}, "persona_steer[0].coeff"),  # no plain statistics at layer 2
        ({"norm": 1.0, "sd": 1.0}, "persona_steer[0].coeff"),
        ({"raw": 1.0}, "persona_steer[0].coeff"),
        ({"norm": "x"}, "persona_steer[0].coeff.norm"),
        ({"norm": 1e9}, "persona_steer[0].coeff"),  # over the raw-coefficient limit
    ):
        with pytest.raises(PersonaSpecError) as err:
            parse_spec([{"vector": "evil", "coeff": coeff, "layers": [2]}], None, library)
        assert err.value.field == field, (coeff, err.value)
