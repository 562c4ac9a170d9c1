"""`personavec sweep`: steering strength by layer and coefficient for an extracted vector."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from personavec_vllm.cli._args import floats, ints


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="measure steering effect per layer and coefficient; record the recommended layer",
        description="Judge-free multiple-choice measure (mean probability of the trait-expressing answer) "
        "for each layer and coefficient; writes a CSV table and a PNG plot and records the recommended "
        "layer in the vector file's metadata.",
    )
    p.add_argument("vector", help="vector file (.safetensors)")
    p.add_argument("--trait", default=None, help="trait definition (default: the vector's trait)")
    p.add_argument("--model", default=None, help="HF model folder (default: the embedded model)")
    p.add_argument("--layers", type=ints, default=None)
    p.add_argument("--coeffs", type=floats, default=[-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0])
    p.add_argument("--out", default=None, help="folder for the table and plot (default: beside the vector, reports/)")
    p.add_argument("--no-record", action="store_true", help="do not rewrite the vector's recommended layer")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace, extra: list[str]) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from personavec_vllm.extract import sweep as sweeping
    from personavec_vllm.hf.layers import decoder_layers
    from personavec_vllm.models import resolve_model
    from personavec_vllm.traits import load_trait
    from personavec_vllm.vectors import load_vector

    vector_path = Path(args.vector)
    vector = load_vector(vector_path)
    trait = load_trait(args.trait or vector.trait)
    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    vector.check_fits(len(decoder_layers(model)), model.config.hidden_size)
    layers = args.layers or list(range(2, vector.num_layers - 1, 2))
    rows = sweeping.sweep(model, tokenizer, trait, vector, layers, args.coeffs)
    layer = sweeping.recommend_layer(rows)
    out = Path(args.out) if args.out else vector_path.parent / "reports"
    sweeping.write_table(rows, out / f"{vector.name}.sweep.csv")
    sweeping.plot(rows, trait.name, out / f"{vector.name}.sweep.png", recommended=layer)
    if not args.no_record:
        sweeping.record_layer(vector_path, vector, layer, rows)
    print(
        json.dumps(
            {
                "recommended_layer": layer,
                "effect": sweeping.steering_effect(rows, layer),
                "table": str(out / f"{vector.name}.sweep.csv"),
                "plot": str(out / f"{vector.name}.sweep.png"),
            }
        )
    )
    return 0
