"""`personavec screen`: rank training samples by projection difference (data screening)."""

from __future__ import annotations

import argparse
import sys

from personavec_vllm.cli._args import add_vector_options, default_vectors, names, percent


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "screen",
        help="rank training samples by projection difference (data screening)",
        description="For each sample (x, y) generate the model's own answer y' with vLLM and compute "
        "dP = (h(x,y) - h(x,y')) . v_hat, the mean response activation difference projected on each persona "
        "vector at its layer. Writes per-sample scores (scores.jsonl, scores.csv), the dataset mean per trait "
        "and a ranked review list (summary.json, review.md), a histogram per trait (hist.<vector>.png) and, "
        "with --filter-top/--filter-above, the filtered dataset in the input's format. Finished batches go to "
        "OUT/checkpoint.jsonl; running the same command again resumes.",
        allow_abbrev=False,
    )
    p.add_argument(
        "data",
        metavar="DATA",
        help="OpenAI 'messages' JSONL (the last assistant message is the response), "
        "prompt/response JSONL, or CSV with prompt,response columns",
    )
    add_vector_options(p)
    p.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="output folder (also holds the resume checkpoint)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per generation batch and checkpoint record")
    p.add_argument("--max-tokens", type=int, default=256, help="length cap of the model's own answers")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 (default) is greedy; above 0 samples with the engine seed (a resumed run then "
        "differs from an uninterrupted one in the samples computed after the interruption)",
    )
    p.add_argument("--seed", type=int, default=0, help="vLLM engine seed")
    p.add_argument("--top-k", type=int, default=20, help="samples per trait in the review list")
    f = p.add_argument_group("filtering (writes OUT/filtered.<ext> and OUT/removed.<ext>)")
    f.add_argument(
        "--filter-top", type=percent, default=None, metavar="PCT", help="drop the PCT %% of samples with the highest dP"
    )
    f.add_argument(
        "--filter-above", type=float, default=None, metavar="THRESHOLD", help="drop samples with dP above THRESHOLD"
    )
    f.add_argument(
        "--filter-trait",
        type=names,
        default=None,
        metavar="NAMES",
        help="vectors that decide (default: all; a sample goes if any of them drops it)",
    )
    p.add_argument(
        "--skip-malformed",
        action="store_true",
        help="skip malformed lines (reported, with line numbers) instead of stopping",
    )
    p.add_argument("--restart", action="store_true", help="discard the checkpoint in --out and start over")
    p.add_argument("--compiled", action="store_true", help="vLLM compiled mode (slower start, faster generation)")
    r = p.add_argument_group("scale-out (Ray Data; pip install 'personavec-vllm[ray]')")
    r.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="local (default): one engine in this process; ray: batches shared over Ray Data actors, one engine "
        "each (this process keeps the checkpoint: either backend resumes the other's run)",
    )
    r.add_argument(
        "--ray-address", default=None, help="Ray cluster to join ('auto', 'ray://HOST:10001'); default: a local Ray"
    )
    r.add_argument("--ray-actors", type=int, default=2, help="actors, one vLLM engine each (default 2)")
    r.add_argument("--ray-cpus-per-actor", type=int, default=1, help="CPU cores per actor (default 1)")
    r.add_argument("--ray-gpus-per-actor", type=float, default=0.0, help="GPUs per actor (default 0; 1 on GPU nodes)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_screen)


def cmd_screen(args: argparse.Namespace, extra: list[str]) -> int:
    import logging

    from personavec_vllm.library import load_vectors
    from personavec_vllm.models import ModelUnavailableError, resolve_model
    from personavec_vllm.screen import (
        FilterSpec,
        MalformedInputError,
        ScreenError,
        ScreenSettings,
        read_dataset,
        screen_dataset,
    )
    from personavec_vllm.screen.report import review_markdown
    from personavec_vllm.vectors import VectorFileError

    prog = "personavec screen"
    logging.basicConfig(level=logging.INFO, format="[personavec] %(message)s")
    try:
        dataset = read_dataset(args.data, skip_malformed=args.skip_malformed)
        for m in dataset.malformed:
            print(f"{prog}: skipping malformed {args.data} {m}", file=sys.stderr)
        vectors = load_vectors(args.vectors or default_vectors(args.model), args.traits)
        model = resolve_model(args.model)
        filter_names = None
        if args.filter_trait:
            by_trait = {v.trait: v.name for v in vectors}
            filter_names = [n if n in {v.name for v in vectors} else by_trait.get(n, n) for n in args.filter_trait]
        settings = ScreenSettings(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=args.seed,
            batch_size=args.batch_size,
            top_k=args.top_k,
            compiled=args.compiled,
            layers={v.name: args.layer for v in vectors} if args.layer else None,
        )
        ray = None
        if args.backend == "ray":
            from personavec_vllm.screen.ray_backend import RayOptions

            ray = RayOptions(args.ray_actors, args.ray_address, args.ray_cpus_per_actor, args.ray_gpus_per_actor)
        elif args.ray_address is not None:
            raise ScreenError("--ray-address needs --backend ray")
        result = screen_dataset(
            dataset,
            vectors,
            model,
            args.out,
            settings,
            restart=args.restart,
            skip_malformed=args.skip_malformed,
            progress=not args.quiet,
            filters=FilterSpec(args.filter_top, args.filter_above, filter_names),
            ray=ray,
        )
    except MalformedInputError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ScreenError, VectorFileError, ModelUnavailableError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    summary = result.summary
    print(review_markdown({**summary, "review": {k: v[:5] for k, v in summary["review"].items()}}).rstrip())
    print()
    for name, path in result.files.items():
        print(f"{name}: {path}")
    rate = f", {result.computed / result.seconds:.2f} samples/s" if result.computed and result.seconds > 0 else ""
    print(
        f"screened {summary['samples']} samples ({result.computed} computed in this run, "
        f"{summary['samples'] - result.computed} from the checkpoint) in {result.seconds:.1f} s{rate} "
        f"(+ {result.startup_seconds:.1f} s engine start)",
        file=sys.stderr,
    )
    return 0
