"""Write <trait>.labels.jsonl from hand decisions in decisions_<trait>.py.

Hand labels by a personavec-vllm developer session, no LLM judge (2026-12-03).
Each decisions file defines HELDOUT and PLAIN: lists of (strength, coherent, note),
one per input line, in input order.
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
    path = HERE / f"{trait}.labels.jsonl"
    with open(path, "w") as f:
        for o in out:
            f.write(json.dumps(o, ensure_ascii=False) + "\n")
    print(f"wrote {path} ({len(out)} lines)")


if __name__ == "__main__":
    for t in sys.argv[1:]:
        main(t)
