"""Write <trait>.labels.jsonl and <trait>.answers.labels.jsonl from hand decisions.

Hand labels by personavec-vllm developer sessions, no LLM judge (2026-12-03).
decisions_<trait>.py defines HELDOUT and PLAIN: lists of (strength, coherent, note), one per
input line, in input order (the held-out and plain replies: validation).
decisions_<trait>_answers.py, where present, defines ANSWERS: {line: (strength, coherent, note)}
for every line of ../reports/<trait>.answers.jsonl (the extraction answers, labelled blind in a
shuffled order: the filter `personavec extract --labels` applies). Its output names each
answer's text by digest, so labels never silently apply to regenerated answers.
"""
import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPORTS = HERE.parent / "reports"


def load_decisions(trait):
    spec = importlib.util.spec_from_file_location(f"d_{trait}", HERE / f"decisions_{trait}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {"heldout": mod.HELDOUT, "plain": mod.PLAIN}


def main(trait):
    dec = load_decisions(trait)
    out = []
    for source in ("heldout", "plain"):
        rows = [json.loads(l) for l in (REPORTS / f"{trait}.{source}.jsonl").read_text().splitlines() if l.strip()]
        d = dec[source]
        assert len(d) == len(rows), (trait, source, len(d), len(rows))
        for i, (row, (strength, coherent, note)) in enumerate(zip(rows, d)):
            assert strength in (0, 1, 2, 3) and isinstance(coherent, bool) and note
            out.append({
                "source": source,
                "line": i,
                "question": row["question"],
                "positive": row["positive"] if source == "heldout" else None,
                "label": int(strength >= 2),
                "strength": strength,
                "coherent": coherent,
                "note": note,
            })
    write(HERE / f"{trait}.labels.jsonl", out)
    answers_decisions = HERE / f"decisions_{trait}_answers.py"
    if answers_decisions.exists():
        write(HERE / f"{trait}.answers.labels.jsonl", answers_labels(trait, answers_decisions))


def answers_labels(trait, decisions_path):
    from personavec_vllm.extract.judge import text_digest

    spec = importlib.util.spec_from_file_location(f"a_{trait}", decisions_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = [json.loads(l) for l in (REPORTS / f"{trait}.answers.jsonl").read_text().splitlines() if l.strip()]
    assert sorted(mod.ANSWERS) == list(range(len(rows))), (trait, len(mod.ANSWERS), len(rows))
    out = []
    for i, row in enumerate(rows):
        strength, coherent, note = mod.ANSWERS[i]
        assert strength in (0, 1, 2, 3) and isinstance(coherent, bool) and note
        out.append({
            "line": i,
            "question": row["question"],
            "text_sha": text_digest(row["text"]),
            "label": int(strength >= 2),
            "strength": strength,
            "coherent": coherent,
            "note": note,
        })
    return out


def write(path, rows):
    with open(path, "w") as f:
        for o in rows:
            f.write(json.dumps(o, ensure_ascii=False) + "\n")
    print(f"wrote {path} ({len(rows)} lines)")


if __name__ == "__main__":
    for t in sys.argv[1:]:
        main(t)
