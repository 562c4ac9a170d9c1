"""llama.cpp / repeng control-vector GGUF import and export (fast, no engine).

The layer mapping under test (see personavec_vllm/interop.py for the full reasoning):
our row L (residual stream after decoder layer L-1) <-> `direction.{L-1}`, because
llama.cpp adds `direction.N` to the output of decoder layer N
(ggml-org/llama.cpp: common/common.cpp `common_control_vector_load_one` puts direction.N at
buffer offset n_embd*(N-1); src/llama-adapter.cpp `llama_adapter_cvec::apply` fills
tensors[il] from offset n_embd*(il-1); src/models/llama.cpp calls `build_cvec(cur, il)` on the
output of decoder layer il), and repeng does the same (vgel/repeng: repeng/control.py adds
directions[layer_id] to the output of model.layers[layer_id]; repeng/extract.py reads
hidden_states[layer + 1] for directions[layer] and exports it as direction.{layer}).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from personavec_vllm.cli import main
from personavec_vllm.interop import (
    GGUFInteropError,
    direction_to_row,
    export_gguf,
    import_gguf,
    row_to_direction,
)
from personavec_vllm.vectors import PersonaVector, VectorFileError, load_vector, save_vector

L, H = 6, 16


def _vector(name="evil", layer=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return PersonaVector(
        name=name,
        vectors=torch.randn(L + 1, H, generator=gen),
        trait="evil",
        model="tiny-llama",
        layer=layer,
        description="d",
    )


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _write(path, tensors: dict, arch="controlvector", model_hint="llama", **kv):
    """A GGUF written the way repeng's ControlVector.export_gguf does (no personavec keys)."""
    writer = gguf.GGUFWriter(path, arch)
    if model_hint is not None:
        writer.add_string(f"{arch}.model_hint", model_hint)
    writer.add_uint32(f"{arch}.layer_count", len(tensors))
    for key, value in kv.items():
        writer.add_string(key, value)
    for name, values in tensors.items():
        writer.add_tensor(name, np.asarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---- round trip ---------------------------------------------------------------------------


def test_round_trip_is_exact_for_all_exportable_layers(tmp_path):
    v = _vector()
    path = export_gguf(v, tmp_path / "evil.gguf")
    back = import_gguf(path, name="evil", trait="evil", model="tiny-llama")
    assert back.vectors.shape == v.vectors.shape and back.vectors.dtype == torch.float32
    assert torch.equal(back.vectors[2:], v.vectors[2:])  # bit-exact
    # Row 0 (embeddings) and row 1 (direction.0, refused by llama.cpp) are not in the file.
    assert not back.vectors[:2].any()
    assert back.layer == 3 and back.extra["gguf_layers"] == "2,3,4,5,6"
    assert back.method == "response_avg_diff"


def test_round_trip_of_selected_layers_keeps_the_model_shape(tmp_path):
    v = _vector()
    path = export_gguf(v, tmp_path / "evil.gguf", layers=[4, 3])
    back = import_gguf(path, name="evil2", trait="evil", model="tiny-llama")
    # personavec.num_layers restores the full shape although the file stops at direction.3.
    assert back.num_layers == L
    assert torch.equal(back.vectors[[3, 4]], v.vectors[[3, 4]])
    assert not back.vectors[[0, 1, 2, 5, 6]].any()
    assert back.layer == 3  # the vector's recommended layer, present in the file
    # Through a safetensors file as well.
    again = load_vector(save_vector(back, tmp_path / "evil2.safetensors"))
    assert torch.equal(again.vectors, back.vectors) and again.extra["gguf_layers"] == "3,4"


def test_coeff_scales_the_written_directions(tmp_path):
    v = _vector()
    path = export_gguf(v, tmp_path / "evil.gguf", layers=[3], coeff=-2.5)
    (t,) = gguf.GGUFReader(path).tensors
    assert np.allclose(t.data, -2.5 * v.vectors[3].numpy(), rtol=1e-6, atol=0)
    back = import_gguf(path, name="evil", trait="evil", model="tiny-llama")
    assert torch.allclose(back.vectors[3], -2.5 * v.vectors[3], rtol=1e-6, atol=0)
    assert back.extra["gguf_coeff"] == "-2.5"


# ---- what llama.cpp reads -------------------------------------------------------------------


def test_file_has_the_names_types_and_metadata_llama_cpp_expects(tmp_path):
    path = export_gguf(_vector(), tmp_path / "evil.gguf", layers=[2, 3, 6])
    reader = gguf.GGUFReader(path)
    fields = _fields(reader)
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == "tiny-llama"
    assert fields["controlvector.layer_count"] == 3  # number of directions, as repeng writes
    assert reader.fields["controlvector.layer_count"].types == [gguf.GGUFValueType.UINT32]
    assert fields["personavec.num_layers"] == L and fields["personavec.layer"] == 3
    # common_control_vector_load_one: every tensor is direction.<int >= 1>, F32, 1-D, n_embd.
    assert [t.name for t in reader.tensors] == ["direction.1", "direction.2", "direction.5"]
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == [H] and t.n_elements == H


def test_model_hint_can_be_set(tmp_path):
    path = export_gguf(_vector(), tmp_path / "evil.gguf", layers=[3], model_hint="llama")
    assert _fields(gguf.GGUFReader(path))["controlvector.model_hint"] == "llama"


# ---- the index mapping, explicitly ----------------------------------------------------------


def test_row_L_is_written_as_direction_L_minus_1(tmp_path):
    # Row L = residual stream after decoder layer L-1. llama.cpp adds direction.N to the output
    # of decoder layer N (src/models/llama.cpp: `cur = build_cvec(cur, il)` at the end of layer
    # il; src/llama-adapter.cpp: tensors[il] <- direction.il), so row L must be direction.{L-1}.
    vectors = torch.zeros(L + 1, H)
    for row in range(L + 1):
        vectors[row] = float(row)  # every element of row L equals L
    v = PersonaVector(name="marked", vectors=vectors, trait="t", model="m", layer=3)
    path = export_gguf(v, tmp_path / "marked.gguf")
    by_name = {t.name: t.data for t in gguf.GGUFReader(path).tensors}
    assert sorted(by_name) == [f"direction.{n}" for n in range(1, L)]
    for row in range(2, L + 1):
        assert np.all(by_name[f"direction.{row - 1}"] == row)
    assert row_to_direction(20) == 19 and direction_to_row(19) == 20


def test_direction_N_is_imported_as_row_N_plus_1(tmp_path):
    # A repeng-style file: directions[N] is added to model.layers[N]'s output (repeng/control.py)
    # and was read from hidden_states[N + 1] (repeng/extract.py): our row N + 1.
    path = _write(
        tmp_path / "repeng.gguf", {f"direction.{n}": np.full(H, 10.0 * n, dtype=np.float32) for n in (1, 2, 5)}
    )
    back = import_gguf(path, name="r", trait="t", model="m")
    assert back.num_layers == 6  # highest direction + 1
    for n in (1, 2, 5):
        assert torch.all(back.vectors[n + 1] == 10.0 * n)
    assert not back.vectors[[0, 1, 4, 5]].any()
    assert back.layer == 3  # middle present row of 2, 3, 6
    assert back.extra["gguf_model_hint"] == "llama"
    assert back.method == "gguf_control_vector"


def test_direction_0_from_repeng_maps_to_row_1(tmp_path):
    # llama.cpp refuses direction.0, repeng can write it (output of model.layers[0]) and we
    # read it as row 1; we never write it.
    path = _write(tmp_path / "zero.gguf", {"direction.0": np.ones(H, dtype=np.float32)})
    back = import_gguf(path, name="z", trait="t", model="m", num_layers=4)
    assert torch.all(back.vectors[1] == 1) and back.vectors[[0, 2, 3, 4]].abs().sum() == 0


def test_mapping_matches_adding_to_the_decoder_layer_output_in_hf(tmp_path):
    """Apply the exported file the way llama.cpp and repeng do (direction.N added to the
    output of decoder module N) to a tiny HF Llama: only hidden_states[L] (our row L) and later
    move, and hidden_states[L] moves by exactly the row we exported."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=H,
        intermediate_size=32,
        num_hidden_layers=L,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config).eval()
    row = 4
    vectors = torch.zeros(L + 1, H)
    vectors[row] = torch.randn(H)
    v = PersonaVector(name="one", vectors=vectors, trait="t", model="m", layer=row)
    path = export_gguf(v, tmp_path / "one.gguf", layers=[row])

    def add(direction):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (output[0] + direction,) + output[1:]
            return output + direction

        return hook

    handles = []
    for t in gguf.GGUFReader(path).tensors:
        n = int(t.name.split(".")[1])
        handles.append(model.model.layers[n].register_forward_hook(add(torch.tensor(t.data))))
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        steered = model(ids, output_hidden_states=True).hidden_states
        for h in handles:
            h.remove()
        plain = model(ids, output_hidden_states=True).hidden_states
    for k in range(row):
        assert torch.equal(steered[k], plain[k])
    assert torch.allclose(steered[row] - plain[row], vectors[row].expand_as(plain[row]), atol=1e-5)


# ---- export arguments -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "layers, message",
    [
        ([1], "direction.0"),
        ([0, 3], "outside 1..6"),
        ([7], "outside 1..6"),
        ([], "empty"),
    ],
)
def test_export_refuses_layers_without_a_slot(tmp_path, layers, message):
    with pytest.raises(GGUFInteropError, match=message):
        export_gguf(_vector(), tmp_path / "x.gguf", layers=layers)
    assert not (tmp_path / "x.gguf").exists()


def test_export_refuses_non_finite_coeff(tmp_path):
    with pytest.raises(GGUFInteropError, match="finite"):
        export_gguf(_vector(), tmp_path / "x.gguf", layers=[3], coeff=float("nan"))


# ---- bad files --------------------------------------------------------------------------------


def test_refuses_a_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFInteropError, match="not a readable GGUF"):
        import_gguf(path, name="x", trait="t", model="m")
    with pytest.raises(GGUFInteropError, match="no such file"):
        import_gguf(tmp_path / "missing.gguf", name="x", trait="t", model="m")


def test_refuses_a_model_gguf(tmp_path):
    path = _write(
        tmp_path / "model.gguf", {"token_embd.weight": np.zeros((4, H), np.float32)}, arch="llama", model_hint=None
    )
    with pytest.raises(GGUFInteropError, match="general.architecture 'llama'.*'controlvector'"):
        import_gguf(path, name="x", trait="t", model="m")


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({}, "no direction"),
        (
            {"direction.1": np.ones(H, np.float32), "blk.0.attn_q.weight": np.ones(H, np.float32)},
            "'blk.0.attn_q.weight' is not named direction",
        ),
        ({"direction.x": np.ones(H, np.float32)}, "not named direction"),
        ({"direction.1": np.ones((2, H), np.float32)}, "must be 1-D"),
        (
            {"direction.1": np.ones(H, np.float32), "direction.2": np.ones(H + 1, np.float32)},
            "17 elements but earlier directions have 16",
        ),
        ({"direction.1": np.ones(H, np.int32)}, "type I32"),
        ({"direction.1": np.full(H, np.inf, np.float32)}, "non-finite"),
    ],
)
def test_refuses_malformed_control_vectors(tmp_path, tensors, message):
    path = _write(tmp_path / "bad.gguf", tensors)
    with pytest.raises(VectorFileError, match=message):
        import_gguf(path, name="x", trait="t", model="m")


def test_refuses_directions_beyond_the_model_and_absent_recommended_layer(tmp_path):
    path = _write(tmp_path / "v.gguf", {"direction.5": np.ones(H, np.float32)})
    with pytest.raises(GGUFInteropError, match="needs at least 6 decoder layers"):
        import_gguf(path, name="x", trait="t", model="m", num_layers=4)
    with pytest.raises(GGUFInteropError, match="layer 3 has no direction.*present layers: 6"):
        import_gguf(path, name="x", trait="t", model="m", layer=3)


# ---- CLI --------------------------------------------------------------------------------------


def test_cli_export_then_import(tmp_path, capsys):
    v = _vector()
    src = save_vector(v, tmp_path / "evil.safetensors")
    out = tmp_path / "evil.gguf"
    assert main(["vectors", "export-gguf", str(src), str(out), "--layers", "3,4", "--coeff", "1.0"]) == 0
    assert "direction.2, direction.3" in capsys.readouterr().out
    assert [t.name for t in gguf.GGUFReader(out).tensors] == ["direction.2", "direction.3"]

    dst = tmp_path / "lib" / "evil_back.safetensors"
    assert (
        main(["vectors", "import-gguf", str(out), str(dst), "--trait", "evil", "--model", "tiny-llama", "--layer", "4"])
        == 0
    )
    back = load_vector(dst)
    assert back.name == "evil_back" and back.layer == 4 and back.trait == "evil"
    assert torch.equal(back.vectors[[3, 4]], v.vectors[[3, 4]])


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    src = save_vector(_vector(), tmp_path / "evil.safetensors")
    assert main(["vectors", "export-gguf", str(src), str(tmp_path / "x.gguf"), "--layers", "1"]) == 1
    assert "direction.0" in capsys.readouterr().err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"\0" * 64)
    assert (
        main(["vectors", "import-gguf", str(bad), str(tmp_path / "o.safetensors"), "--trait", "t", "--model", "m"]) == 1
    )
    assert "not a readable GGUF" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["vectors", "export-gguf", str(src), str(tmp_path / "x.gguf"), "--layers", "a,b"])
