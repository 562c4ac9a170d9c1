"""Preventative steering, end to end on the embedded default model (CPU, a few minutes).

1. Build a small trait-inducing dataset: answers written under the `evil` trait's positive system
   prompts (from the shipped vector's extraction report `vectors/<model>/reports/evil.answers.jsonl`
   when it exists, else generated now with vLLM), stored as plain user -> assistant conversations
   without the system prompt (OpenAI `messages` JSONL), so fine-tuning teaches the trait.
2. Fine-tune LoRA adapters (peft + transformers `Trainer`) twice from the same start, same data
   order and seed: once plainly, once inside `preventative_steering(model, evil, coeff)`.
3. Measure each tuned model's trait shift against the base model with `personavec_vllm.screen.
   measure_shift` (last-prompt-token activations on the trait's evaluation questions, projected on
   the vector), with the steering hook removed.

Writes into `examples/results/`: the dataset, `preventative_steering.json` (settings, losses,
shifts), `preventative_steering.md` (table) and `preventative_steering_shift.png` (shift per layer).

    python examples/preventative_steering.py                        # both runs, 20 steps each
    python examples/preventative_steering.py --runs plain           # one run at a time (each saved
    python examples/preventative_steering.py --runs preventative    # in results/runs/; the report
                                                                    # combines runs with equal settings)
    python examples/preventative_steering.py --screen       # also screen the dataset (mean dP)

Needs `pip install -e .[train]` (peft).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from personavec_vllm.data import vectors_dir
from personavec_vllm.hf.hidden import chat_prompt
from personavec_vllm.library import load_vectors
from personavec_vllm.models import DEFAULT_MODEL_NAME, resolve_model
from personavec_vllm.screen import load_hf, measure_shift, plot_shift, shift_table
from personavec_vllm.training import preventative_steering
from personavec_vllm.traits import load_trait
from personavec_vllm.vectors import PersonaVector

ROOT = Path(__file__).resolve().parent.parent
RUNS = ("plain", "preventative")
DEFAULT_VECTORS = vectors_dir(DEFAULT_MODEL_NAME)
RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(f"[example] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# data


def trait_answers(
    trait_name: str, vectors_dir: Path, model_path: str, max_samples: int, seed: int
) -> tuple[list[dict], str]:
    """(question, answer) pairs written under the trait's positive system prompts."""
    report = vectors_dir / "reports" / f"{trait_name}.answers.jsonl"
    if report.is_file():
        rows = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines() if line.strip()]
        pairs = [{"question": r["question"], "answer": r["text"]} for r in rows if r.get("positive") and r.get("text")]
        source = str(report.relative_to(ROOT) if report.is_relative_to(ROOT) else report)
    else:
        log(f"{report} not found: generating answers under the positive system prompts with vLLM")
        from personavec_vllm.engine.llm import make_llm, shutdown
        from personavec_vllm.extract.pipeline import generate_answers

        trait = load_trait(trait_name)
        llm = make_llm(model_path, seed=seed, max_model_len=1024, enforce_eager=True)
        try:
            answers = generate_answers(
                llm, trait, trait.extraction_questions, samples=2, max_tokens=96, temperature=0.8
            )
        finally:
            shutdown(llm)
        pairs = [{"question": a.question, "answer": a.text} for a in answers if a.positive and a.text]
        source = "generated now (vLLM, positive system prompts of the trait, temperature 0.8)"
    seen, unique = set(), []
    for p in pairs:
        if (p["question"], p["answer"]) not in seen:
            seen.add((p["question"], p["answer"]))
            unique.append(p)
    random.Random(seed).shuffle(unique)
    return unique[:max_samples], source


def write_messages_jsonl(pairs: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": p["question"]},
                        {"role": "assistant", "content": p["answer"]},
                    ]
                }
            )
            + "\n"
            for p in pairs
        ),
        encoding="utf-8",
    )


def tokenize(pairs: list[dict], tokenizer, max_len: int) -> list[dict]:
    """Chat-formatted examples; the loss covers only the answer and its end-of-turn token."""
    out = []
    for p in pairs:
        ids, start = chat_prompt(tokenizer, None, p["question"], p["answer"])
        ids = (ids + [tokenizer.eos_token_id])[:max_len]
        out.append({"input_ids": ids, "labels": [-100] * start + ids[start:]})
    return out


def collate(pad_id: int):
    def fn(batch):
        width = max(len(b["input_ids"]) for b in batch)
        return {
            "input_ids": torch.tensor([b["input_ids"] + [pad_id] * (width - len(b["input_ids"])) for b in batch]),
            "attention_mask": torch.tensor(
                [[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch]
            ),
            "labels": torch.tensor([b["labels"] + [-100] * (width - len(b["labels"])) for b in batch]),
        }

    return fn


# ---------------------------------------------------------------------------------------
# training


def finetune(model_path: str, data: list[dict], tokenizer, args, steer: tuple[PersonaVector, float, int] | None):
    """LoRA fine-tune; `steer` = (vector, coeff, layer) wraps training in preventative steering."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    model, _ = load_hf(model_path)
    model.train()
    lora = get_peft_model(
        model,
        LoraConfig(
            r=args.lora_rank,
            lora_alpha=2 * args.lora_rank,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=tmp,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=min(10, args.steps // 10),
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=args.seed,
            data_seed=args.seed,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            disable_tqdm=False,
        )
        trainer = Trainer(
            model=lora, args=training_args, train_dataset=data, data_collator=collate(tokenizer.pad_token_id)
        )
        t0 = time.monotonic()
        if steer is None:
            result = trainer.train()
        else:
            vector, coeff, layer = steer
            with preventative_steering(lora, vector, coeff, layers=[layer]):
                result = trainer.train()
        seconds = time.monotonic() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    lora.eval()
    return lora, {"train_loss": result.training_loss, "loss_curve": losses, "train_seconds": round(seconds, 1)}


# ---------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--vectors", default=str(DEFAULT_VECTORS), help="vector library folder")
    p.add_argument("--trait", default="evil")
    p.add_argument(
        "--coeff",
        type=float,
        default=1.0,
        help="steering coefficient during training (default 1.0: for a diff-of-means vector, the whole "
        "difference between trait and non-trait answers; 2.0 overshoots on the default model)",
    )
    p.add_argument("--layer", type=int, default=None, help="steering layer (default: the vector's recommended layer)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--samples", type=int, default=200, help="training samples (at most)")
    p.add_argument("--max-len", type=int, default=96, help="tokens per training example (truncated)")
    p.add_argument("--questions", type=int, default=None, help="evaluation questions for the shift (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--screen", action="store_true", help="also screen the training set (dataset mean dP; starts vLLM)")
    p.add_argument(
        "--runs",
        default=",".join(RUNS),
        help="which fine-tunes to run now (comma-separated: plain, preventative); runs saved earlier "
        "with the same settings are included in the report, so they can be done one at a time",
    )
    p.add_argument("--all-vectors", action="store_true", help="measure the shift on every vector of the library")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if any(r not in RUNS for r in args.runs):
        p.error(f"--runs: choose from {', '.join(RUNS)}")

    torch.manual_seed(args.seed)
    out = Path(args.out)
    model_path = resolve_model(args.model)
    base, tokenizer = load_hf(model_path)
    num_layers, hidden = base.config.num_hidden_layers, base.config.hidden_size

    vectors_dir = Path(args.vectors)
    if (vectors_dir / f"{args.trait}.safetensors").is_file():
        library = load_vectors([vectors_dir])
        vector_path = (vectors_dir / f"{args.trait}.safetensors").resolve()
        vector_source = str(vector_path.relative_to(ROOT) if vector_path.is_relative_to(ROOT) else vector_path)
    else:
        log(
            f"WARNING: no {args.trait}.safetensors in {vectors_dir}: using a RANDOM direction (the result then "
            "only shows that the code runs)"
        )
        gen = torch.Generator().manual_seed(args.seed)
        rows = torch.randn(num_layers + 1, hidden, generator=gen)
        rows = rows / rows.norm(dim=1, keepdim=True) * 2.0
        library = [
            PersonaVector(
                name=args.trait,
                vectors=rows,
                trait=args.trait,
                model=str(model_path),
                layer=num_layers // 2,
                description="random stand-in",
            )
        ]
        vector_source = "random stand-in"
    vector = next(v for v in library if v.name == args.trait)
    vector.check_fits(num_layers, hidden)
    layer = args.layer or vector.layer
    coeff = args.coeff
    log(f"vector {vector.name!r}: layer {layer}, |v[{layer}]| = {vector.vectors[layer].norm():.3f}, coeff {coeff}")

    pairs, data_source = trait_answers(args.trait, vectors_dir, model_path, args.samples, args.seed)
    data_path = out / f"{args.trait}_train.jsonl"
    write_messages_jsonl(pairs, data_path)
    data = tokenize(pairs, tokenizer, args.max_len)
    log(f"{len(data)} training samples ({data_source}) -> {data_path}")

    results = {
        "model": str(model_path),
        "trait": args.trait,
        "vector": vector_source,
        "layer": layer,
        "coeff": coeff,
        "vector_norm_at_layer": float(vector.vectors[layer].norm()),
        "dataset": {
            "path": str(data_path.relative_to(ROOT) if data_path.is_relative_to(ROOT) else data_path),
            "samples": len(data),
            "source": data_source,
        },
        "training": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "lora_rank": args.lora_rank,
            "max_len": args.max_len,
            "seed": args.seed,
        },
        "runs": {},
    }
    # Runs saved with the same settings (coefficient aside) go into one report.
    settings_key = {k: results[k] for k in ("model", "trait", "vector", "layer")}
    settings_key.update(
        training=results["training"], samples=len(data), questions=args.questions, all_vectors=args.all_vectors
    )
    if args.screen:
        from personavec_vllm.screen import ScreenSettings, read_dataset, screen_dataset

        t0 = time.monotonic()
        screened = screen_dataset(
            read_dataset(data_path),
            library,
            model_path,
            out / "screen",
            ScreenSettings(max_tokens=128),
            hf=(base, tokenizer),
        )
        results["screen"] = {
            name: {"mean_dP": s["mean_dP"], "layer": s["layer"]} for name, s in screened.summary["vectors"].items()
        }
        results["screen_seconds"] = round(time.monotonic() - t0, 1)

    shift_vectors = library if args.all_vectors else [vector]
    runs_dir = out / "runs"
    for run in args.runs:
        steer = None if run == "plain" else (vector, coeff, layer)
        name = "plain" if steer is None else f"preventative_c{coeff:g}"
        log(f"fine-tuning ({name}) for {args.steps} steps ...")
        tuned, info = finetune(model_path, data, tokenizer, args, steer)
        tuned = tuned.merge_and_unload()  # same function, plain forward passes (faster to measure)
        rows = measure_shift(
            base, tuned, shift_vectors, tokenizer=tokenizer, max_questions=args.questions, layers={vector.name: layer}
        )
        del tuned
        record = {"settings": settings_key, "coeff": None if steer is None else coeff, **info, "shift_rows": rows}
        runs_dir.mkdir(parents=True, exist_ok=True)
        (runs_dir / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        shift = next(r["shift"] for r in rows if r["vector"] == vector.name)
        log(
            f"{name}: train loss {info['train_loss']:.3f}, {args.trait} shift {shift:+.4f} (saved {runs_dir / (name + '.json')})"
        )

    # The report covers every run saved with these settings (runs may come from separate invocations):
    # the plain run and one preventative run per coefficient.
    records = []
    for path in sorted(runs_dir.glob("*.json")) if runs_dir.is_dir() else []:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("settings") == settings_key:
            records.append((path.stem, record))
    records.sort(key=lambda item: (item[1]["coeff"] is not None, item[1]["coeff"] or 0.0))
    series = {}
    for _name, record in records:
        label = "plain" if record["coeff"] is None else f"preventative, coeff {record['coeff']:g}"
        series[label] = record["shift_rows"]
        results["runs"][label] = {k: v for k, v in record.items() if k not in ("settings", "shift_rows")}
        results["runs"][label]["shift"] = {
            r["vector"]: {k: v for k, v in r.items() if k != "vector"} for r in record["shift_rows"]
        }
    if "plain" in results["runs"]:
        plain = results["runs"]["plain"]["shift"][vector.name]["shift"]
        results["summary"] = {
            "plain_shift": plain,
            "preventative_shift": {
                str(r["coeff"]): r["shift"][vector.name]["shift"]
                for label, r in results["runs"].items()
                if label != "plain"
            },
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "preventative_steering.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    lines = [
        f"# Preventative steering: {args.trait} on {Path(model_path).name}",
        "",
        f"Data: {len(data)} samples ({data_source}). LoRA r={args.lora_rank} on every linear layer, "
        f"{args.steps} steps x batch {args.batch_size}, lr {args.lr}, max {args.max_len} tokens, seed {args.seed} "
        f"(every run starts from the same weights and sees the same batches). Preventative runs add coeff x "
        f"{vector.name}[{layer}] after decoder layer {layer - 1} at every position while training "
        f"(|v[{layer}]| = {results['vector_norm_at_layer']:.3f}); vector: {vector_source}. Shift: mean "
        "last-prompt-token activation on the trait's evaluation questions, tuned minus base, projected on the "
        "unit vector, measured after the hook is removed.",
        "",
        f"| run | final train loss | {args.trait} shift at layer {layer} |",
        "|---|---:|---:|",
    ]
    for run in series:
        r = results["runs"][run]
        lines.append(f"| {run} | {r['train_loss']:.3f} | {r['shift'][vector.name]['shift']:+.4f} |")
    if "screen" in results:
        lines += [
            "",
            "Dataset screening (mean projection difference): "
            + ", ".join(f"{n} {s['mean_dP']:+.4f} (layer {s['layer']})" for n, s in results["screen"].items()),
        ]
    for run, rows in series.items():
        lines += ["", f"## {run}: shift per vector", "", shift_table(rows)]
    (out / "preventative_steering.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if series:
        plot_shift(
            {run: [r for r in rows if r["vector"] == vector.name] for run, rows in series.items()},
            out / "preventative_steering_shift.png",
            title=f"{args.trait} shift after LoRA fine-tuning, with and without preventative steering",
        )
    print("\n".join(lines[:10]))
    print(f"\nwrote {out}/preventative_steering.{{json,md}}, preventative_steering_shift.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
