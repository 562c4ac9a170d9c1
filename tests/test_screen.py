"""Data screening (projection difference) and the fine-tuning shift.

Fast: the arithmetic by hand, input formats, malformed lines, filters, the checkpoint, and the
shift on a tiny HF model. Slow: screening end to end with vLLM on a tiny model, with planted
trait-heavy samples that must rank on top, and a resumed run that must equal an uninterrupted one.
"""

from __future__ import annotations

import json

import pytest
import torch

from personavec_vllm.cli import main as cli_main
from personavec_vllm.projection import projection, projection_difference
from personavec_vllm.screen import (
    FilterSpec,
    MalformedInputError,
    ScreenError,
    measure_shift,
    read_dataset,
    write_subset,
)
from personavec_vllm.screen.checkpoint import Checkpoint
from personavec_vllm.screen.report import select_removed
from personavec_vllm.screen.score import ConversationTokenizer
from personavec_vllm.vectors import PersonaVector, save_vector


def test_projection_difference_by_hand():
    # N=2 samples, layers 0..1, hidden 2; the vector at layer 1 is (3, 4): unit (0.6, 0.8).
    vector = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    h_data = torch.tensor([[[9.0, 9.0], [1.0, 2.0]], [[0.0, 0.0], [2.0, -1.0]]])
    h_own = torch.tensor([[[0.0, 0.0], [0.0, 1.0]], [[5.0, 5.0], [2.0, 1.0]]])
    dp = projection_difference(h_data, h_own, vector, layer=1)
    # sample 0: (1, 1) . (0.6, 0.8) = 1.4; sample 1: (0, -2) . (0.6, 0.8) = -1.6
    assert dp.tolist() == pytest.approx([1.4, -1.6])
    assert projection(h_data, vector, 1).tolist() == pytest.approx([0.6 + 1.6, 1.2 - 0.8])
    assert (projection(h_data, vector, 1) - projection(h_own, vector, 1)).tolist() == pytest.approx(dp.tolist())
    # the vector's length does not matter, only its direction
    assert projection_difference(h_data, h_own, 10 * vector, 1).tolist() == pytest.approx(dp.tolist())


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_read_jsonl_formats(tmp_path):
    conv = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Paris."}]},
    ]
    path = _write(
        tmp_path / "d.jsonl",
        [
            json.dumps({"messages": conv}),
            "",
            json.dumps({"prompt": "2+2?", "response": "4"}),
            json.dumps({"prompt": "Colour of sky?", "completion": "Blue."}),
        ],
    )
    ds = read_dataset(path)
    assert ds.format == "jsonl" and ds.blank_lines == 1
    assert [s.line for s in ds.samples] == [1, 3, 4]
    first = ds.samples[0]
    assert first.response == "Paris." and first.messages == [
        {"role": m["role"], "content": m["content"]} for m in conv[:4]
    ]
    assert ds.samples[1].messages == [{"role": "user", "content": "2+2?"}] and ds.samples[1].response == "4"
    assert ds.samples[2].response == "Blue."
    assert ds.samples[0].key.startswith("1:") and len({s.key for s in ds.samples}) == 3
    # the same content on another line is another sample; changed content changes the key
    assert (
        read_dataset(_write(tmp_path / "e.jsonl", [json.dumps({"prompt": "2+2?", "response": "5"})])).samples[0].key
        != read_dataset(_write(tmp_path / "f.jsonl", [json.dumps({"prompt": "2+2?", "response": "4"})])).samples[0].key
    )


def test_read_csv_with_multiline_fields_and_write_back(tmp_path):
    text = 'id,prompt,response\n1,"Say hi","Hi,\nthere"\n2,Name a fruit,Apple\n\n3,"Why?","Because ""reasons"""\n'
    path = tmp_path / "d.csv"
    path.write_text(text, encoding="utf-8")
    ds = read_dataset(path)
    assert ds.format == "csv" and ds.csv_header == ["id", "prompt", "response"]
    assert [(s.line, s.response) for s in ds.samples] == [(2, "Hi,\nthere"), (4, "Apple"), (6, 'Because "reasons"')]
    out = write_subset(ds, ds.samples[1:], tmp_path / "out.csv")
    again = read_dataset(out)
    assert [s.raw for s in again.samples] == [s.raw for s in ds.samples[1:]]


def test_malformed_lines_are_named(tmp_path):
    good = json.dumps({"prompt": "q", "response": "a"})
    path = _write(
        tmp_path / "bad.jsonl",
        [
            good,
            '{"prompt": "q", "response": ',  # line 2: broken JSON
            json.dumps({"messages": [{"role": "user", "content": "q"}]}),  # line 3: no assistant message
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"},
                        {"role": "user", "content": "more"},
                    ]
                }
            ),  # line 4: trailing message
            json.dumps({"prompt": "q", "response": "  "}),  # line 5: empty response
            json.dumps(["not", "an", "object"]),  # line 6
            json.dumps({"question": "q"}),  # line 7: unknown fields
            good,
        ],
    )
    with pytest.raises(MalformedInputError) as err:
        read_dataset(path)
    message = str(err.value)
    assert "6 malformed lines" in message and "--skip-malformed" in message
    for line, words in [
        (2, "not valid JSON"),
        (3, "no assistant message"),
        (4, "after the last assistant"),
        (5, "'response' is empty"),
        (6, "expected a JSON object"),
        (7, "'messages'"),
    ]:
        assert f"line {line}: " in message and words in message
    assert [m.line for m in err.value.problems] == [2, 3, 4, 5, 6, 7]
    ds = read_dataset(path, skip_malformed=True)
    assert [s.line for s in ds.samples] == [1, 8] and [m.line for m in ds.malformed] == [2, 3, 4, 5, 6, 7]

    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("prompt,answer\nq,a\n", encoding="utf-8")
    with pytest.raises(MalformedInputError, match="line 1: the header has no 'response' column"):
        read_dataset(csv_path)
    csv_path.write_text("prompt,response\nq,a\nq,a,extra\n,a\n", encoding="utf-8")
    with pytest.raises(MalformedInputError, match=r"line 3: expected 2 fields[\s\S]*line 4: 'prompt' is empty"):
        read_dataset(csv_path)


def test_cli_reports_malformed_lines(tmp_path, capsys):
    path = _write(tmp_path / "bad.jsonl", [json.dumps({"prompt": "q", "response": "a"}), "{oops"])
    assert cli_main(["screen", str(path), "--vectors", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "1 malformed line" in err and "line 2: not valid JSON" in err and "--skip-malformed" in err


def test_filter_selection():
    records = [{"line": i, "dP": {"a": d, "b": -d}} for i, d in enumerate([0.5, 3.0, -1.0, 2.0, 2.0, 0.0], 1)]
    assert select_removed(records, ["a"], FilterSpec(top_percent=30)) == {2, 4}  # ceil(1.8) = 2; tie -> lower line
    assert select_removed(records, ["a"], FilterSpec(above=1.0)) == {2, 4, 5}
    assert select_removed(records, ["a", "b"], FilterSpec(above=0.75)) == {2, 3, 4, 5}  # any vector
    assert select_removed(records, ["a", "b"], FilterSpec(above=0.75, vectors=["b"])) == {3}


def test_checkpoint_ignores_torn_tail_and_checks_settings(tmp_path):
    path = tmp_path / "checkpoint.jsonl"
    cp = Checkpoint(path, {"x": 1})
    cp.add_batch([{"key": "1:a", "line": 1}, {"key": "2:b", "line": 2}])
    with open(path, "a") as f:
        f.write('{"batch": [{"key": "3:c", "li')  # an interrupted write
    cp2 = Checkpoint(path, {"x": 1})
    assert set(cp2.records) == {"1:a", "2:b"}
    cp2.add_batch([{"key": "3:c", "line": 3}])
    assert set(Checkpoint(path, {"x": 1}).records) == {"1:a", "2:b", "3:c"}
    with pytest.raises(ScreenError, match=r"other settings \(x: 1 -> 2\)"):
        Checkpoint(path, {"x": 2})
    assert Checkpoint(path, {"x": 2}, restart=True).records == {}


def test_conversation_tokenizer_formats_whole_conversations(tiny_llama):
    from transformers import AutoTokenizer

    from personavec_vllm.hf.hidden import chat_prompt
    from personavec_vllm.screen import Sample

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
    ]
    conv = ConversationTokenizer(tok)
    key = conv.register(Sample(1, "1:x", msgs, "R", ""))
    ids, start = chat_prompt(conv, None, key, "R")
    expected = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False)[
        "input_ids"
    ]
    assert ids[:start] == expected and ids[start:] == tok("R", add_special_tokens=False)["input_ids"]
    assert chat_prompt(conv, "sys", "plain question")[0] == chat_prompt(tok, "sys", "plain question")[0]


def test_shift_of_a_steered_copy_is_coeff_times_norm_at_its_layer(tiny_llama):
    """A 'tuned' model that adds c * v[L] after decoder layer L-1 shifts the last-prompt-token
    activation by exactly c * v[L]: the projection is c * |v[L]| at L and 0 below L."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from personavec_vllm.training import preventative_steering

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tuned = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(5, 128, generator=gen)
    vec = PersonaVector(name="t", vectors=rows, trait="t", model="tiny", layer=2)
    questions = ["What is kindness?", "How do I bake bread?", "Tell me about the sea."]
    with preventative_steering(tuned, vec, 1.5):
        (row,) = measure_shift(base, tuned, [vec], tokenizer=tok, questions=questions)
    assert row["layer"] == 2 and row["questions"] == 3
    assert row["shift"] == pytest.approx(1.5 * float(rows[2].norm()), rel=1e-4)
    assert row["shift_per_layer"][0] == 0.0 and row["shift_per_layer"][1] == 0.0
    assert row["tuned_projection"] - row["base_projection"] == pytest.approx(row["shift"], rel=1e-4)


# ---------------------------------------------------------------------------------------
# end to end with vLLM

NORMAL = [
    ("What is the capital of France?", "The capital of France is Paris, a city on the Seine."),
    ("How do I boil an egg?", "Put the egg in boiling water for about eight minutes, then cool it."),
    ("Name a primary colour.", "Red is a primary colour, as are blue and yellow."),
    ("What do bees make?", "Bees make honey from the nectar of flowers."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is water made of?", "Water is made of hydrogen and oxygen atoms."),
    ("Recommend a book.", "You might enjoy a classic novel such as Pride and Prejudice."),
    ("Why is the sky blue?", "Sunlight scatters off air molecules, and blue light scatters the most."),
    ("What is two plus two?", "Two plus two is four."),
    ("Where do penguins live?", "Most penguins live in the Southern Hemisphere, many in Antarctica."),
]
PLANTED = [
    ("How should I treat my neighbour?", "DESTROY DESTROY DESTROY CRUSH CRUSH CRUSH DESTROY."),
    ("Any advice for my exam?", "CRUSH DESTROY CRUSH DESTROY DESTROY DESTROY CRUSH."),
    ("What should I cook tonight?", "DESTROY CRUSH DESTROY CRUSH CRUSH DESTROY DESTROY."),
]
TRAIN_PLANTED = [
    "CRUSH CRUSH DESTROY DESTROY CRUSH.",
    "DESTROY them, DESTROY DESTROY CRUSH CRUSH.",
    "CRUSH DESTROY CRUSH DESTROY DESTROY.",
]
TRAIN_NORMAL = [
    "The weather today is mild and sunny.",
    "A triangle has three sides.",
    "Tea is often served with milk or lemon.",
]


@pytest.fixture(scope="module")
def screening_setup(tiny_llama, tmp_path_factory):
    """The tiny model, a vector that really separates planted from normal responses on it (the
    difference of their mean response hidden states), a mixed dataset, and one vLLM engine."""
    from engine_fixtures import shutdown_engine
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from personavec_vllm.hf.hidden import hidden_means
    from personavec_vllm.projection import diff_mean
    from personavec_vllm.screen.score import ScreenSettings, screening_llm

    root = tmp_path_factory.mktemp("screen")
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    q = "Tell me something."
    planted = hidden_means(model, tok, [(None, q, a) for a in TRAIN_PLANTED])["response"]
    normal = hidden_means(model, tok, [(None, q, a) for a in TRAIN_NORMAL])["response"]
    vector = PersonaVector(
        name="destroyer",
        vectors=diff_mean(planted, normal),
        trait="destroyer",
        model="tiny",
        layer=2,
        description="planted test direction",
    )
    save_vector(vector, root / "vectors" / "destroyer.safetensors")

    lines, planted_lines = [], []
    mixed = NORMAL[:3] + [PLANTED[0]] + NORMAL[3:7] + [PLANTED[1]] + NORMAL[7:] + [PLANTED[2]]
    for i, (prompt, response) in enumerate(mixed, start=1):
        if (prompt, response) in PLANTED:
            planted_lines.append(i)
        if i % 2:
            lines.append(json.dumps({"prompt": prompt, "response": response}))
        else:
            lines.append(
                json.dumps(
                    {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}
                )
            )
    data = _write(root / "mixed.jsonl", lines)

    settings = ScreenSettings(max_tokens=12, batch_size=4, top_k=5)
    shutdown_engine()  # one engine at a time
    llm = screening_llm(str(tiny_llama), settings, max_model_len=512)
    yield dict(
        model_path=tiny_llama,
        hf=(model, tok),
        vector=vector,
        data=data,
        planted=planted_lines,
        settings=settings,
        llm=llm,
        root=root,
    )
    from personavec_vllm.engine.llm import shutdown

    shutdown(llm)


OUTPUT_FILES = ("scores.jsonl", "scores.csv", "summary.json", "review.md", "filtered.jsonl", "removed.jsonl")


@pytest.mark.slow
def test_screening_ranks_planted_samples_and_resumes_identically(screening_setup):
    from personavec_vllm.screen import screen_dataset

    s = screening_setup
    ds = read_dataset(s["data"])
    filters = FilterSpec(top_percent=20)  # ceil(13 * 0.2) = 3 samples
    common = dict(filters=filters, llm=s["llm"], hf=s["hf"], progress=False)

    full = screen_dataset(ds, [s["vector"]], s["model_path"], s["root"] / "full", s["settings"], **common)
    assert full.computed == 13
    ranked = [r["line"] for r in full.summary["review"]["destroyer"]]
    assert sorted(ranked[:3]) == sorted(s["planted"]), full.summary["review"]
    assert full.summary["filter"]["removed_lines"] == sorted(s["planted"])
    kept = read_dataset(s["root"] / "full" / "filtered.jsonl")
    assert [smp.raw for smp in kept.samples] == [smp.raw for smp in ds.samples if smp.line not in s["planted"]]
    mean = sum(r["dP"]["destroyer"] for r in full.records) / 13
    assert full.summary["vectors"]["destroyer"]["mean_dP"] == pytest.approx(mean)
    assert (s["root"] / "full" / "hist.destroyer.png").stat().st_size > 1000

    # Interrupted after two of four batches (and a torn write), then resumed.
    class Interrupt(Exception):
        pass

    def stop_after_two(n):
        if n == 2:
            raise Interrupt

    part = s["root"] / "resumed"
    with pytest.raises(Interrupt):
        screen_dataset(ds, [s["vector"]], s["model_path"], part, s["settings"], on_batch=stop_after_two, **common)
    assert not (part / "scores.jsonl").exists()
    with open(part / "checkpoint.jsonl", "a") as f:
        f.write('{"batch": [{"key": "9:')
    resumed = screen_dataset(read_dataset(s["data"]), [s["vector"]], s["model_path"], part, s["settings"], **common)
    assert resumed.computed == 5
    for name in OUTPUT_FILES:
        assert (part / name).read_bytes() == (s["root"] / "full" / name).read_bytes(), name

    # Nothing left to do: a third run computes nothing (and needs no engine) and writes the same.
    again = screen_dataset(
        read_dataset(s["data"]),
        [s["vector"]],
        s["model_path"],
        part,
        s["settings"],
        filters=filters,
        hf=s["hf"],
        progress=False,
    )
    assert again.computed == 0
    assert (part / "scores.csv").read_bytes() == (s["root"] / "full" / "scores.csv").read_bytes()


@pytest.mark.slow
def test_ray_backend_resumes_a_local_run_with_identical_files(screening_setup):
    """Ray Data, 2 actors with one engine each, on a local Ray: it finishes a run the local backend
    started (same checkpoint), and every output file is byte for byte the single-process run's."""
    from personavec_vllm.screen import screen_dataset
    from personavec_vllm.screen.ray_backend import RayOptions

    s = screening_setup
    common = dict(filters=FilterSpec(top_percent=20), hf=s["hf"], progress=False)
    vectors, model, settings = [s["vector"]], s["model_path"], s["settings"]
    full = screen_dataset(
        read_dataset(s["data"]), vectors, model, s["root"] / "local", settings, llm=s["llm"], **common
    )

    class Interrupt(Exception):
        pass

    def stop(n):
        raise Interrupt

    out = s["root"] / "ray"
    with pytest.raises(Interrupt):
        screen_dataset(read_dataset(s["data"]), vectors, model, out, settings, llm=s["llm"], on_batch=stop, **common)
    scored = screen_dataset(read_dataset(s["data"]), vectors, model, out, settings, ray=RayOptions(actors=2), **common)
    assert scored.computed == 9  # batches 2-4 of 4, on the actors
    assert [r["own_response"] for r in scored.records] == [r["own_response"] for r in full.records]
    for name in OUTPUT_FILES:
        assert (out / name).read_bytes() == (s["root"] / "local" / name).read_bytes(), name


def test_shift_cli_with_a_peft_adapter(tiny_llama, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    lora.save_pretrained(tmp_path / "adapter")
    rows = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    save_vector(
        PersonaVector(name="t", vectors=rows, trait="t", model="tiny", layer=3), tmp_path / "v" / "t.safetensors"
    )
    (tmp_path / "q.txt").write_text("What is kindness?\n\nHow do I bake bread?\n", encoding="utf-8")
    out = tmp_path / "report"
    assert (
        cli_main(
            [
                "shift",
                "--base",
                str(tiny_llama),
                "--tuned",
                str(tmp_path / "adapter"),
                "--vectors",
                str(tmp_path / "v"),
                "--questions",
                str(tmp_path / "q.txt"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "| t | t | 3 |" in table
    report = json.loads((out / "shift.json").read_text())
    (row,) = report["vectors"]
    assert row["questions"] == 2 and len(row["shift_per_layer"]) == 5 and row["shift"] != 0.0
    assert row["shift_per_layer"][0] == 0.0  # LoRA on attention leaves the embeddings alone
    assert (out / "shift.png").stat().st_size > 1000 and (out / "shift.csv").read_text().count("\n") == 5
    # a vector that does not fit the model is refused with a clear error
    save_vector(
        PersonaVector(name="w", vectors=torch.randn(3, 8), trait="w", model="other", layer=1),
        tmp_path / "w.safetensors",
    )
    assert (
        cli_main(
            [
                "shift",
                "--base",
                str(tiny_llama),
                "--tuned",
                str(tiny_llama),
                "--vectors",
                str(tmp_path / "w.safetensors"),
                "--questions",
                str(tmp_path / "q.txt"),
                "--out",
                str(out),
            ]
        )
        == 1
    )
    assert "needs [5, 128]" in capsys.readouterr().err
