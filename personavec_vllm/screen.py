"""Vet training data with persona vectors: the projection difference, and the fine-tuning shift.

Projection difference (Chen et al., 2025). For a training sample (x, y), let y' be the model's
own answer to x. With `h(x, y)` the mean residual stream over the response tokens at a vector's
layer L and `v_hat = v[L] / |v[L]|`:

    dP = (h(x, y) - h(x, y')) . v_hat

A sample with a large dP pulls the model towards the trait more than the model's own answer
would; the dataset mean predicts how far fine-tuning on the data moves the trait.

`screen_dataset` reads a dataset (`read_dataset`: OpenAI `messages` JSONL, prompt/response JSONL,
or CSV with prompt,response columns), generates every y' with vLLM in fixed batches, computes
hidden means with `extract.pipeline.hidden_means` (HF forward pass), and appends each finished
batch to `OUT/checkpoint.jsonl`. A re-run skips finished samples (keyed by line number and content
hash); the final files are built from the checkpoint only, so an interrupted and resumed run
writes the same files as an uninterrupted one (with greedy decoding, the default).

Fine-tuning shift. `measure_shift`: mean last-prompt-token activation on the traits' evaluation
questions (chat template), tuned model minus base model, projected on each vector's unit rows:
at the vector's layer and at every layer.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from personavec_vllm.extract.pipeline import chat_prompt, hidden_means
from personavec_vllm.vectors import PersonaVector, VectorFileError, load_vector, unit_rows

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.jsonl"
CHECKPOINT_VERSION = 1
ROLES = ("system", "developer", "user", "assistant", "tool")


class ScreenError(RuntimeError):
    """Screening cannot go on (bad settings, a checkpoint from other settings, ...)."""


# ---------------------------------------------------------------------------------------
# input


@dataclass
class Sample:
    """One training sample: prompt x (chat messages) and response y."""

    line: int  # 1-based line of the input file where the record starts
    key: str  # "<line>:<sha256 of the record's text, 16 hex>"
    messages: list[dict[str, str]]  # x, without the response
    response: str  # y
    raw: str | list[str]  # the JSONL line's text, or the CSV row's fields


@dataclass(frozen=True)
class Malformed:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


class MalformedInputError(ValueError):
    """Some input lines are not samples; every one is listed with its line number."""

    def __init__(self, path: str | os.PathLike, problems: Sequence[Malformed], hint: str = ""):
        self.path = str(path)
        self.problems = list(problems)
        shown = [f"  {p}" for p in self.problems[:50]]
        if len(self.problems) > 50:
            shown.append(f"  ... and {len(self.problems) - 50} more")
        n = len(self.problems)
        super().__init__(f"{path}: {n} malformed line{'s' if n != 1 else ''}:\n" + "\n".join(shown) + hint)


@dataclass
class Dataset:
    path: Path
    format: str  # "jsonl" or "csv"
    samples: list[Sample]
    malformed: list[Malformed] = field(default_factory=list)
    csv_header: list[str] | None = None
    blank_lines: int = 0


def _key(line: int, text: str) -> str:
    return f"{line}:{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}"


def _content_text(content, where: str) -> str:
    """A message's content: a string, or OpenAI content parts of type text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise ValueError(f"{where}.content must be a string or a list of text parts, got {type(content).__name__}")


def parse_messages(messages) -> tuple[list[dict[str, str]], str]:
    """OpenAI chat messages -> (prompt messages, response): the last assistant message is the
    response, every message before it the prompt. Raises ValueError naming the problem."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        clean.append({"role": role, "content": _content_text(m.get("content"), f"messages[{i}]")})
    last = max((i for i, m in enumerate(clean) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("no assistant message (the last assistant message is the response to screen)")
    if last != len(clean) - 1:
        n = len(clean) - 1 - last
        raise ValueError(f"{n} message{'s' if n != 1 else ''} after the last assistant message "
                         f"(messages[{last}]); the response must be the last message")
    prompt = clean[:last]
    if not any(m["role"] == "user" for m in prompt):
        raise ValueError("no user message before the response")
    if not clean[last]["content"].strip():
        raise ValueError(f"messages[{last}] (the response) is empty")
    return prompt, clean[last]["content"]


def _parse_json_record(text: str) -> tuple[list[dict[str, str]], str]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return parse_messages(obj["messages"])
    if "prompt" in obj or "response" in obj or "completion" in obj:
        return _prompt_response(obj.get("prompt"), obj.get("response", obj.get("completion")))
    raise ValueError("expected a 'messages' list or 'prompt' and 'response' fields")


def _prompt_response(prompt, response) -> tuple[list[dict[str, str]], str]:
    for name, value in (("prompt", prompt), ("response", response)):
        if not isinstance(value, str):
            raise ValueError(f"'{name}' must be a string, got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"'{name}' is empty")
    return [{"role": "user", "content": prompt}], response


def read_dataset(path: str | os.PathLike, *, skip_malformed: bool = False) -> Dataset:
    """Read a JSONL (`messages` or `prompt`/`response` per line) or CSV (`prompt`,`response`
    columns) dataset. Malformed lines raise `MalformedInputError` listing every one, unless
    `skip_malformed` (then they are in `Dataset.malformed`). Blank lines are not samples."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise MalformedInputError(path, [Malformed(line, f"not UTF-8 text ({exc.reason})")]) from None
    fmt = "csv" if path.suffix.lower() in (".csv", ".tsv") else "jsonl"
    samples, malformed, blank = [], [], 0
    header = None
    if fmt == "jsonl":
        for number, line_text in enumerate(text.splitlines(), start=1):
            if not line_text.strip():
                blank += 1
                continue
            try:
                messages, response = _parse_json_record(line_text)
            except ValueError as exc:
                malformed.append(Malformed(number, str(exc)))
                continue
            samples.append(Sample(number, _key(number, line_text), messages, response, line_text))
    else:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        end = 0
        try:
            header = next(reader)
        except StopIteration:
            raise MalformedInputError(path, [Malformed(1, "empty file; expected a header with prompt,response")]) from None
        except csv.Error as exc:
            raise MalformedInputError(path, [Malformed(1, f"not valid CSV ({exc})")]) from None
        columns = {name.strip().lower(): i for i, name in enumerate(header)}
        missing = [c for c in ("prompt", "response") if c not in columns]
        if missing:
            raise MalformedInputError(path, [Malformed(1, f"the header has no {' and no '.join(repr(m) for m in missing)} "
                                                          f"column (found {', '.join(header) or 'none'})")])
        end = reader.line_num
        while True:
            start = end + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                malformed.append(Malformed(start, f"not valid CSV ({exc})"))
                break  # the reader cannot resynchronise after a broken quote
            end = reader.line_num
            if not row or not any(cell.strip() for cell in row):
                blank += 1
                continue
            if len(row) != len(header):
                malformed.append(Malformed(start, f"expected {len(header)} fields like the header, got {len(row)}"))
                continue
            try:
                messages, response = _prompt_response(row[columns["prompt"]], row[columns["response"]])
            except ValueError as exc:
                malformed.append(Malformed(start, str(exc)))
                continue
            samples.append(Sample(start, _key(start, json.dumps(row)), messages, response, row))
    if malformed and not skip_malformed:
        raise MalformedInputError(path, malformed, "\n(fix them, or pass --skip-malformed to screen the other lines)")
    if not samples:
        raise MalformedInputError(path, malformed or [Malformed(1, "no samples in the file")])
    return Dataset(path, fmt, samples, malformed, header, blank)


def write_subset(dataset: Dataset, samples: Sequence[Sample], path: str | os.PathLike) -> Path:
    """Write `samples` in the dataset's own format (JSONL lines verbatim; CSV with its header)."""
    if dataset.format == "jsonl":
        text = "".join(s.raw + "\n" for s in samples)
    else:
        buf = io.StringIO(newline="")
        writer = csv.writer(buf, delimiter="\t" if dataset.path.suffix.lower() == ".tsv" else ",")
        writer.writerow(dataset.csv_header)
        writer.writerows(s.raw for s in samples)
        text = buf.getvalue()
    return atomic_write_text(path, text)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ---------------------------------------------------------------------------------------
# vectors


def load_vectors(specs: Sequence[str | os.PathLike], names: Sequence[str] | None = None) -> list[PersonaVector]:
    """Vector files and/or library folders (each folder's `*.safetensors`, not sub-folders),
    optionally only the vectors whose name (or else trait) is in `names`, in that order."""
    found: dict[str, PersonaVector] = {}
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise VectorFileError(f"{path}: no *.safetensors vector files in this folder")
        elif path.is_file():
            files = [path]
        else:
            raise VectorFileError(f"{path}: no such vector file or folder")
        for f in files:
            vector = load_vector(f)
            if vector.name in found:
                raise VectorFileError(f"two vectors are named {vector.name!r} ({f}); pass only one of them")
            found[vector.name] = vector
    if names:
        by_trait = {v.trait: v for v in found.values()}
        unknown = [n for n in names if n not in found and n not in by_trait]
        if unknown:
            raise VectorFileError(f"unknown vector(s) {', '.join(unknown)}; loaded: {', '.join(found) or 'none'}")
        return [found[n] if n in found else by_trait[n] for n in names]
    if not found:
        raise VectorFileError("no vectors given")
    return list(found.values())


def _vector_fingerprint(vector: PersonaVector) -> str:
    return hashlib.sha256(vector.vectors.contiguous().numpy().tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# arithmetic


def projection(h: torch.Tensor, vector: torch.Tensor, layer: int) -> torch.Tensor:
    """`h . v_hat` at `layer` for hidden means `h` of shape `[N, L+1, H]` -> `[N]`."""
    return h[:, layer].float() @ unit_rows(vector[layer])


def projection_difference(h_data: torch.Tensor, h_own: torch.Tensor, vector: torch.Tensor, layer: int) -> torch.Tensor:
    """dP = (h(x, y) - h(x, y')) . v_hat at `layer`; inputs `[N, L+1, H]` (response means), `[N]` out."""
    return (h_data[:, layer].float() - h_own[:, layer].float()) @ unit_rows(vector[layer])


# ---------------------------------------------------------------------------------------
# prompts


class ConversationTokenizer:
    """The tokenizer seen by `chat_prompt`/`hidden_means`, which format one (system, question)
    turn: a question that is a registered key expands to that sample's whole prompt conversation,
    so multi-turn prompts are formatted by the model's own chat template too."""

    PREFIX = "\x00personavec-sample:"

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._conversations: dict[str, list[dict[str, str]]] = {}

    def register(self, sample: Sample) -> str:
        key = self.PREFIX + sample.key
        self._conversations[key] = sample.messages
        return key

    def apply_chat_template(self, messages, *args, **kwargs):
        if len(messages) == 1 and messages[0].get("content") in self._conversations:
            messages = self._conversations[messages[0]["content"]]
        return self._tokenizer.apply_chat_template(messages, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


# ---------------------------------------------------------------------------------------
# screening


@dataclass
class ScreenSettings:
    max_tokens: int = 256  # length cap of the model's own answers y'
    temperature: float = 0.0  # 0: greedy (resumed runs are then identical to uninterrupted ones)
    seed: int = 0  # vLLM engine seed (LLM(seed=)); no per-request seeds (they crash the CPU sampler)
    batch_size: int = 32  # samples per generate call and per checkpoint record
    top_k: int = 20  # samples per trait in the review list
    compiled: bool = False  # vLLM compiled mode instead of eager
    layers: dict[str, int] | None = None  # per-vector layer override (default: the recommended layer)

    def checkpoint_config(self) -> dict:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "seed": self.seed,
                "batch_size": self.batch_size}


@dataclass
class FilterSpec:
    top_percent: float | None = None  # drop the PCT % of samples with the highest dP
    above: float | None = None  # drop samples with dP above this
    vectors: list[str] | None = None  # which vectors decide (default: all); a sample goes if any says so

    def active(self) -> bool:
        return self.top_percent is not None or self.above is not None


@dataclass
class ScreenResult:
    records: list[dict]  # per sample, in file order
    summary: dict
    files: dict[str, str]
    computed: int  # samples computed in this run (the rest came from the checkpoint)
    seconds: float  # wall time of this run's computing (generation + hidden states), engine start excluded
    startup_seconds: float = 0.0  # starting the vLLM engine


def _layer_of(vector: PersonaVector, settings: ScreenSettings) -> int:
    layer = (settings.layers or {}).get(vector.name, vector.layer)
    if not 1 <= layer <= vector.num_layers:
        raise ScreenError(f"layer {layer} for vector {vector.name!r} is outside 1..{vector.num_layers}")
    return layer


class Checkpoint:
    """`OUT/checkpoint.jsonl`: a header line with the settings, then one line per finished batch
    (`{"batch": [record, ...]}`), appended and fsynced. A torn last line (interrupted write) is
    ignored, so a batch counts only when all of it is on disk."""

    def __init__(self, path: Path, config: dict, restart: bool = False):
        self.path = path
        self.config = config
        self.records: dict[str, dict] = {}
        if restart and path.exists():
            path.unlink()
        if path.exists():
            self._load()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"personavec_screen_checkpoint": CHECKPOINT_VERSION, "config": config})

    def _load(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        try:
            head = json.loads(lines[0])
        except (json.JSONDecodeError, UnicodeDecodeError):
            head = {}
        if not isinstance(head, dict) or head.get("personavec_screen_checkpoint") != CHECKPOINT_VERSION:
            raise ScreenError(f"{self.path} is not a personavec screening checkpoint; remove it or pass --restart")
        if head.get("config") != self.config:
            old, new = head.get("config") or {}, self.config
            diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            raise ScreenError(f"{self.path} was written with other settings ({'; '.join(diff)}); "
                              "pass the same settings to resume, or --restart to start over")
        good = len(lines[0]) + 1  # bytes of complete lines
        for line in lines[1:]:
            if not line.endswith(b"}") or good + len(line) + 1 > len(data):
                break  # the last line, torn or empty
            try:
                batch = json.loads(line)["batch"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                break
            for rec in batch:
                self.records[rec["key"]] = rec
            good += len(line) + 1
        if good < len(data):  # drop a torn tail (an interrupted write) so appends start clean
            logger.warning("%s: dropping an incomplete batch record (interrupted write)", self.path)
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def _append(self, obj: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(obj) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add_batch(self, records: list[dict]) -> None:
        self._append({"batch": records})
        for rec in records:
            self.records[rec["key"]] = rec


def make_llm(model_path: str, settings: ScreenSettings, max_model_len: int):
    """The vLLM engine for the model's own answers (CPU-friendly defaults)."""
    from vllm import LLM

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # Prefix caching off: reused cache blocks may differ from recomputed ones in the last bits,
    # and a resumed run (whose cache starts empty) must produce the same answers.
    return LLM(model=str(model_path), dtype="float32", seed=settings.seed, max_model_len=max_model_len,
               gpu_memory_utilization=0.3, enforce_eager=not settings.compiled, enable_prefix_caching=False)


def load_hf(model_path: str | os.PathLike):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    return model, tokenizer


def screen_dataset(
    dataset: Dataset,
    vectors: Sequence[PersonaVector],
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: ScreenSettings | None = None,
    *,
    filters: FilterSpec | None = None,
    restart: bool = False,
    skip_malformed: bool = False,
    llm=None,
    hf=None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> ScreenResult:
    """Screen `dataset` with `vectors`; write the outputs into `out_dir` (see `write_outputs`).

    `llm` (a `vllm.LLM` serving `model_path`) and `hf` (`(model, tokenizer)`) may be passed to
    reuse them; otherwise they are created (the engine only if some sample needs computing) and
    the engine is shut down at the end. `on_batch(n)` is called after each checkpointed batch.
    Samples too long for the model's context are malformed (an error unless `skip_malformed`)."""
    from tqdm import tqdm

    from personavec_vllm.training import unwrap_model

    settings = settings or ScreenSettings()
    filters = filters or FilterSpec()
    out_dir = Path(out_dir)
    if settings.batch_size < 1 or settings.max_tokens < 1:
        raise ScreenError("batch size and max tokens must be at least 1")
    model, tokenizer = hf if hf is not None else load_hf(model_path)
    base = unwrap_model(model)
    num_layers, hidden = base.config.num_hidden_layers, base.config.hidden_size
    for vector in vectors:
        vector.check_fits(num_layers, hidden)
    layers = {v.name: _layer_of(v, settings) for v in vectors}
    if filters.vectors:
        unknown = [n for n in filters.vectors if n not in layers]
        if unknown:
            raise ScreenError(f"filter vector(s) {', '.join(unknown)} are not among the screened vectors "
                              f"({', '.join(layers)})")

    conv = ConversationTokenizer(tokenizer)
    prompt_ids = {s.key: chat_prompt(conv, None, conv.register(s))[0] for s in dataset.samples}
    context = int(getattr(base.config, "max_position_embeddings", 4096) or 4096)
    too_long = []
    for s in dataset.samples:
        n_prompt = len(prompt_ids[s.key])
        n_full = n_prompt + len(tokenizer(s.response, add_special_tokens=False)["input_ids"])
        if n_prompt + 1 > context or n_full > context:
            too_long.append(Malformed(s.line, f"prompt + response are {n_full} tokens (prompt {n_prompt}); "
                                              f"the model's context is {context}"))
    if too_long:
        if not skip_malformed:
            raise MalformedInputError(dataset.path, too_long,
                                      "\n(shorten them, or pass --skip-malformed to screen the other lines)")
        dataset.malformed = sorted(dataset.malformed + too_long, key=lambda m: m.line)
        bad = {m.line for m in too_long}
        dataset.samples = [s for s in dataset.samples if s.line not in bad]

    config = {
        "model": str(model_path),
        "vectors": {v.name: {"layer": layers[v.name], "sha256_16": _vector_fingerprint(v)} for v in vectors},
        **settings.checkpoint_config(),
    }
    checkpoint = Checkpoint(out_dir / CHECKPOINT_NAME, config, restart=restart)
    todo = [s for s in dataset.samples if s.key not in checkpoint.records]
    done_before = len(dataset.samples) - len(todo)
    if done_before:
        logger.info("resuming: %d of %d samples already screened", done_before, len(dataset.samples))

    owns_llm = False
    startup = time.monotonic()
    if todo and llm is None:
        # from every sample, not only those left: a resumed run gets the same engine settings
        longest = max(len(prompt_ids[s.key]) for s in dataset.samples)
        max_model_len = min(context, longest + settings.max_tokens)
        llm = make_llm(str(model_path), settings, max_model_len)
        owns_llm = True
    started = time.monotonic()
    startup_seconds = started - startup
    try:
        from vllm import SamplingParams

        bar = tqdm(total=len(dataset.samples), initial=done_before, desc="screening", unit="sample",
                   disable=not progress)
        batches = [todo[i:i + settings.batch_size] for i in range(0, len(todo), settings.batch_size)]
        for b, batch in enumerate(batches):
            params = []
            for s in batch:
                room = max(1, min(settings.max_tokens, _max_model_len(llm, context) - len(prompt_ids[s.key])))
                # Engine seed only: per-request seeds crash vLLM 0.32's CPU sampler.
                params.append(SamplingParams(max_tokens=room, temperature=settings.temperature,
                                             skip_special_tokens=True))
            bar.set_postfix_str(f"batch {b + 1}/{len(batches)}: generating")
            outputs = llm.generate([{"prompt_token_ids": prompt_ids[s.key]} for s in batch], params, use_tqdm=False)
            own = [o.outputs[0].text.strip() for o in outputs]
            bar.set_postfix_str(f"batch {b + 1}/{len(batches)}: hidden states")
            items = [(None, conv.register(s), s.response) for s in batch] + \
                    [(None, conv.register(s), y) for s, y in zip(batch, own)]
            means = hidden_means(base, conv, items, f" (batch {b + 1}/{len(batches)})")["response"]
            h_data, h_own = means[: len(batch)], means[len(batch):]
            records = []
            for i, (s, y) in enumerate(zip(batch, own)):
                rec = {"key": s.key, "line": s.line, "own_response": y, "dP": {}, "proj_data": {}, "proj_own": {}}
                for v in vectors:
                    layer = layers[v.name]
                    rec["dP"][v.name] = float(projection_difference(h_data[i:i + 1], h_own[i:i + 1], v.vectors, layer)[0])
                    rec["proj_data"][v.name] = float(projection(h_data[i:i + 1], v.vectors, layer)[0])
                    rec["proj_own"][v.name] = float(projection(h_own[i:i + 1], v.vectors, layer)[0])
                records.append(rec)
            checkpoint.add_batch(records)
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(b + 1)
        bar.close()
    finally:
        if owns_llm:
            import contextlib

            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
    seconds = time.monotonic() - started
    records = [checkpoint.records[s.key] for s in dataset.samples]
    summary, files = write_outputs(dataset, records, vectors, layers, out_dir, settings, filters, model_path)
    return ScreenResult(records, summary, files, len(todo), seconds, startup_seconds)


def _max_model_len(llm, fallback: int) -> int:
    try:
        return int(llm.llm_engine.model_config.max_model_len)
    except AttributeError:
        return fallback


# ---------------------------------------------------------------------------------------
# outputs


def _preview(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _prompt_preview(sample: Sample) -> str:
    return _preview(next(m["content"] for m in reversed(sample.messages) if m["role"] == "user"))


def select_removed(records: Sequence[dict], names: Sequence[str], filters: FilterSpec) -> set[int]:
    """Lines to drop: for each deciding vector, the top `top_percent` % by dP (rounded up; ties
    broken by line) and every sample with dP > `above`; a sample goes if any vector drops it."""
    removed: set[int] = set()
    for name in filters.vectors or names:
        if filters.top_percent is not None:
            count = math.ceil(len(records) * filters.top_percent / 100 - 1e-9)
            ranked = sorted(records, key=lambda r: (-r["dP"][name], r["line"]))
            removed.update(r["line"] for r in ranked[:count])
        if filters.above is not None:
            removed.update(r["line"] for r in records if r["dP"][name] > filters.above)
    return removed


def write_outputs(dataset: Dataset, records: list[dict], vectors: Sequence[PersonaVector], layers: dict[str, int],
                  out_dir: Path, settings: ScreenSettings, filters: FilterSpec, model_path) -> tuple[dict, dict]:
    """scores.jsonl, scores.csv, summary.json, review.md, hist.<vector>.png and, when filtering,
    filtered.<ext> / removed.<ext>; every file written atomically."""
    import numpy as np

    names = [v.name for v in vectors]
    by_line = {s.line: s for s in dataset.samples}
    ext = dataset.path.suffix.lower() if dataset.format == "csv" else ".jsonl"
    files = {}

    rows = [{"line": r["line"], "key": r["key"], **{f"dP.{n}": r["dP"][n] for n in names},
             **{f"proj_data.{n}": r["proj_data"][n] for n in names},
             **{f"proj_own.{n}": r["proj_own"][n] for n in names}, "own_response": r["own_response"]}
            for r in records]
    files["scores_jsonl"] = str(atomic_write_text(out_dir / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in rows)))
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["line", "key"])
    writer.writeheader()
    writer.writerows({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()} for row in rows)
    files["scores_csv"] = str(atomic_write_text(out_dir / "scores.csv", buf.getvalue()))

    summary = {
        "input": str(dataset.path), "format": dataset.format, "model": str(model_path),
        "samples": len(records), "blank_lines": dataset.blank_lines,
        "malformed": [{"line": m.line, "reason": m.reason} for m in dataset.malformed],
        "settings": {**settings.checkpoint_config(), "top_k": settings.top_k},
        "vectors": {}, "review": {},
    }
    for v in vectors:
        dp = np.array([r["dP"][v.name] for r in records], dtype=np.float64)
        summary["vectors"][v.name] = {
            "trait": v.trait, "layer": layers[v.name], "mean_dP": float(dp.mean()), "std_dP": float(dp.std()),
            "median_dP": float(np.median(dp)), "min_dP": float(dp.min()), "max_dP": float(dp.max()),
            "fraction_positive": float((dp > 0).mean()),
        }
        ranked = sorted(records, key=lambda r: (-r["dP"][v.name], r["line"]))[: settings.top_k]
        summary["review"][v.name] = [
            {"rank": i + 1, "line": r["line"], "dP": r["dP"][v.name], "prompt": _prompt_preview(by_line[r["line"]]),
             "response": _preview(by_line[r["line"]].response), "own_response": _preview(r["own_response"])}
            for i, r in enumerate(ranked)
        ]
    removed: set[int] = set()
    if filters.active():
        removed = select_removed(records, names, filters)
        kept = [s for s in dataset.samples if s.line not in removed]
        files["filtered"] = str(write_subset(dataset, kept, out_dir / f"filtered{ext}"))
        files["removed"] = str(write_subset(dataset, [s for s in dataset.samples if s.line in removed],
                                            out_dir / f"removed{ext}"))
        summary["filter"] = {"top_percent": filters.top_percent, "above": filters.above,
                             "vectors": filters.vectors or names, "kept": len(kept), "removed": len(removed),
                             "removed_lines": sorted(removed)}
    files["summary"] = str(atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n"))
    files["review"] = str(atomic_write_text(out_dir / "review.md", review_markdown(summary)))
    for v in vectors:
        files[f"hist.{v.name}"] = str(plot_histogram([r["dP"][v.name] for r in records], v.name, layers[v.name],
                                                     out_dir / f"hist.{v.name}.png", filters,
                                                     [r["dP"][v.name] for r in records if r["line"] in removed]))
    return summary, files


def review_markdown(summary: dict) -> str:
    out = [f"# Screening of {summary['input']} ({summary['samples']} samples)", ""]
    out += ["| vector | layer | mean dP | sd | median | max | share > 0 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in summary["vectors"].items():
        out.append(f"| {name} | {s['layer']} | {s['mean_dP']:.4f} | {s['std_dP']:.4f} | {s['median_dP']:.4f} | "
                   f"{s['max_dP']:.4f} | {s['fraction_positive']:.2f} |")
    if summary.get("malformed"):
        out += ["", f"Skipped {len(summary['malformed'])} malformed line(s): "
                + ", ".join(str(m["line"]) for m in summary["malformed"])]
    if "filter" in summary:
        f = summary["filter"]
        out += ["", f"Filter (top {f['top_percent']} %, above {f['above']}, by {', '.join(f['vectors'])}): "
                    f"kept {f['kept']}, removed {f['removed']}"]
    for name, rows in summary["review"].items():
        out += ["", f"## Review first: {name} (highest dP)", "", "| rank | line | dP | prompt | response | model's own answer |",
                "|---:|---:|---:|---|---|---|"]
        cell = lambda t: t.replace("|", "\\|")  # noqa: E731
        out += [f"| {r['rank']} | {r['line']} | {r['dP']:.4f} | {cell(r['prompt'])} | {cell(r['response'])} | "
                f"{cell(r['own_response'])} |" for r in rows]
    return "\n".join(out) + "\n"


def plot_histogram(values: Sequence[float], name: str, layer: int, path: Path, filters: FilterSpec,
                   removed: Sequence[float] = ()) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    bins = np.histogram_bin_edges(values, bins=min(40, max(5, len(values) // 3)))
    ax.hist(values, bins=bins, color="#4477aa", label="samples")
    if len(removed):
        ax.hist(removed, bins=bins, color="#cc3311", label="filtered out")
    ax.axvline(values.mean(), color="black", linestyle="--", label=f"mean {values.mean():.3f}")
    if filters.above is not None:
        ax.axvline(filters.above, color="#cc3311", linestyle=":", label=f"threshold {filters.above:g}")
    ax.set_xlabel(f"projection difference dP on '{name}' (layer {layer})")
    ax.set_ylabel("samples")
    ax.set_title(f"{name}: {len(values)} samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100, metadata={"Software": None})
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ---------------------------------------------------------------------------------------
# fine-tuning shift


def last_prompt_mean(model, tokenizer, questions: Sequence[str], note: str = "") -> torch.Tensor:
    """Mean over `questions` of the residual stream at the last prompt token, each question
    formatted with the chat template (no system prompt of our own): `[num_layers + 1, hidden]`."""
    from personavec_vllm.training import unwrap_model

    base = unwrap_model(model)
    was_training = base.training
    base.eval()
    try:
        return hidden_means(base, tokenizer, [(None, q, "") for q in questions], note)["prompt_last"].mean(dim=0)
    finally:
        base.train(was_training)


def question_sets(vectors: Sequence[PersonaVector], questions: Sequence[str] | None = None,
                  max_questions: int | None = None) -> dict[str, tuple[str, ...]]:
    """Per vector: `questions` if given, else the evaluation questions of its trait definition."""
    from personavec_vllm.extract.traits import load_trait

    out = {}
    for v in vectors:
        if questions:
            qs = list(questions)
        else:
            try:
                qs = load_trait(v.trait).evaluation_questions
            except FileNotFoundError as exc:
                raise ScreenError(f"vector {v.name!r}: no trait definition for {v.trait!r} ({exc}); "
                                  "pass questions (--questions FILE)") from None
        out[v.name] = tuple(qs[:max_questions] if max_questions else qs)
    return out


def measure_shift(base, tuned, vectors: Sequence[PersonaVector], *, tokenizer=None,
                  questions: Sequence[str] | None = None, max_questions: int | None = None,
                  layers: dict[str, int] | None = None) -> list[dict]:
    """Fine-tuning shift per vector: mean last-prompt-token activation of `tuned` minus `base` on
    the traits' evaluation questions, projected on the vector's unit row, at its layer
    (`shift`) and at every layer (`shift_per_layer`, index = layer; 0 = embeddings).

    `base` and `tuned` are HF model folders (loaded one after the other) or model objects
    (plain, PEFT-wrapped or merged; then pass `tokenizer`)."""
    qsets = question_sets(vectors, questions, max_questions)
    unique = sorted(set(qsets.values()))

    def means(model_or_path, label: str) -> dict[tuple[str, ...], torch.Tensor]:
        if isinstance(model_or_path, (str, os.PathLike)):
            model, tok = load_hf(model_or_path)
            tok = tokenizer or tok
        else:
            model, tok = model_or_path, tokenizer
            if tok is None:
                raise ScreenError("pass tokenizer= with model objects")
        return {qs: last_prompt_mean(model, tok, qs, f" ({label})") for qs in unique}

    base_means = means(base, "base model")
    num_layers, hidden = base_means[unique[0]].shape[0] - 1, base_means[unique[0]].shape[1]
    for v in vectors:
        v.check_fits(num_layers, hidden)
    tuned_means = means(tuned, "tuned model")
    rows = []
    for v in vectors:
        qs = qsets[v.name]
        layer = (layers or {}).get(v.name, v.layer)
        unit = unit_rows(v.vectors)
        per_layer = ((tuned_means[qs] - base_means[qs]) * unit).sum(dim=-1)
        rows.append({
            "vector": v.name, "trait": v.trait, "layer": layer, "shift": float(per_layer[layer]),
            "base_projection": float(base_means[qs][layer] @ unit[layer]),
            "tuned_projection": float(tuned_means[qs][layer] @ unit[layer]),
            "vector_norm": float(v.vectors[layer].norm()), "questions": len(qs),
            "shift_per_layer": [float(x) for x in per_layer],
        })
    return rows


def shift_table(rows: Sequence[dict]) -> str:
    lines = ["| vector | trait | layer | shift (tuned - base) | base proj | tuned proj | |v| | questions |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['vector']} | {r['trait']} | {r['layer']} | {r['shift']:+.4f} | {r['base_projection']:.4f} | "
                     f"{r['tuned_projection']:.4f} | {r['vector_norm']:.3f} | {r['questions']} |")
    return "\n".join(lines)


def plot_shift(series: dict[str, Sequence[dict]], path: str | os.PathLike, title: str = "fine-tuning shift") -> Path:
    """One line per (run, vector): shift per layer (1..L), the vector's layer marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    for run, rows in series.items():
        for r in rows:
            ys = r["shift_per_layer"][1:]
            label = f"{r['vector']}" if run == "" else f"{run}: {r['vector']}"
            (line,) = ax.plot(range(1, len(ys) + 1), ys, marker=".", label=label)
            ax.plot([r["layer"]], [r["shift"]], marker="o", markersize=9, color=line.get_color(),
                    markerfacecolor="none")
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("layer (residual stream after decoder layer L-1); circles: the vector's layer")
    ax.set_ylabel("projection of mean activation shift")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100, metadata={"Software": None})
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_shift_outputs(rows: Sequence[dict], out_dir: str | os.PathLike, *, base: str, tuned: str) -> dict[str, str]:
    """shift.json, shift.csv (one row per vector and layer), shift.md and shift.png in `out_dir`."""
    out_dir = Path(out_dir)
    files = {"json": str(atomic_write_text(out_dir / "shift.json", json.dumps(
        {"base": base, "tuned": tuned, "vectors": list(rows)}, indent=2) + "\n"))}
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["vector", "trait", "layer", "shift", "is_vector_layer"])
    for r in rows:
        for layer, value in enumerate(r["shift_per_layer"]):
            if layer:
                writer.writerow([r["vector"], r["trait"], layer, repr(value), int(layer == r["layer"])])
    files["csv"] = str(atomic_write_text(out_dir / "shift.csv", buf.getvalue()))
    files["table"] = str(atomic_write_text(out_dir / "shift.md", f"base: {base}\n\ntuned: {tuned}\n\n{shift_table(rows)}\n"))
    files["plot"] = str(plot_shift({"": rows}, out_dir / "shift.png", title=f"shift: {Path(tuned).name} - {Path(base).name}"))
    return files


# ---------------------------------------------------------------------------------------
# command line: `personavec screen` and `personavec shift`


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _percent(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 100:
        raise argparse.ArgumentTypeError(f"expected a percentage between 0 and 100 (exclusive), got {text!r}")
    return value


def _default_vectors(model_arg: str | None) -> list[str]:
    from personavec_vllm.cli import REPO_VECTORS_DIR
    from personavec_vllm.models import DEFAULT_MODEL_NAME

    shipped = REPO_VECTORS_DIR / DEFAULT_MODEL_NAME
    if model_arg in (None, "", "default", DEFAULT_MODEL_NAME) and any(shipped.glob("*.safetensors")):
        return [str(shipped)]
    raise ScreenError("--vectors is required (the shipped vectors fit only the default model)")


def _add_vector_options(p) -> None:
    p.add_argument("--vectors", nargs="+", action="extend", default=None, metavar="DIR_OR_FILE",
                   help="vector files and/or library folders (default for the embedded model: the shipped "
                        "vectors/SmolLM2-135M-Instruct/)")
    p.add_argument("--traits", type=_names, default=None,
                   help="comma-separated vector names (or traits) to use from --vectors (default: all)")
    p.add_argument("--layer", type=int, default=None, help="layer for every vector (default: each vector's recommended layer)")


def add_screen_parser(sub) -> None:
    p = sub.add_parser(
        "screen", help="rank training samples by projection difference (data screening)",
        description="For each sample (x, y) generate the model's own answer y' with vLLM and compute "
        "dP = (h(x,y) - h(x,y')) . v_hat, the mean response activation difference projected on each persona "
        "vector at its layer. Writes per-sample scores (scores.jsonl, scores.csv), the dataset mean per trait "
        "and a ranked review list (summary.json, review.md), a histogram per trait (hist.<vector>.png) and, "
        "with --filter-top/--filter-above, the filtered dataset in the input's format. Finished batches go to "
        "OUT/checkpoint.jsonl; running the same command again resumes.",
        allow_abbrev=False,
    )
    p.add_argument("data", metavar="DATA", help="OpenAI 'messages' JSONL (the last assistant message is the response), "
                   "prompt/response JSONL, or CSV with prompt,response columns")
    _add_vector_options(p)
    p.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="output folder (also holds the resume checkpoint)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per generation batch and checkpoint record")
    p.add_argument("--max-tokens", type=int, default=256, help="length cap of the model's own answers")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default) is greedy; above 0 samples with the engine seed (a resumed run then "
                        "differs from an uninterrupted one in the samples computed after the interruption)")
    p.add_argument("--seed", type=int, default=0, help="vLLM engine seed")
    p.add_argument("--top-k", type=int, default=20, help="samples per trait in the review list")
    f = p.add_argument_group("filtering (writes OUT/filtered.<ext> and OUT/removed.<ext>)")
    f.add_argument("--filter-top", type=_percent, default=None, metavar="PCT",
                   help="drop the PCT %% of samples with the highest dP")
    f.add_argument("--filter-above", type=float, default=None, metavar="THRESHOLD", help="drop samples with dP above THRESHOLD")
    f.add_argument("--filter-trait", type=_names, default=None, metavar="NAMES",
                   help="vectors that decide (default: all; a sample goes if any of them drops it)")
    p.add_argument("--skip-malformed", action="store_true",
                   help="skip malformed lines (reported, with line numbers) instead of stopping")
    p.add_argument("--restart", action="store_true", help="discard the checkpoint in --out and start over")
    p.add_argument("--compiled", action="store_true", help="vLLM compiled mode (slower start, faster generation)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_screen)


def cmd_screen(args, extra) -> int:
    import sys

    from personavec_vllm.models import ModelUnavailableError, resolve_model

    prog = "personavec screen"
    logging.basicConfig(level=logging.INFO, format="[personavec] %(message)s")
    try:
        dataset = read_dataset(args.data, skip_malformed=args.skip_malformed)
        for m in dataset.malformed:
            print(f"{prog}: skipping malformed {args.data} {m}", file=sys.stderr)
        vectors = load_vectors(args.vectors or _default_vectors(args.model), args.traits)
        model = resolve_model(args.model)
        filter_names = None
        if args.filter_trait:
            by_trait = {v.trait: v.name for v in vectors}
            filter_names = [n if n in {v.name for v in vectors} else by_trait.get(n, n) for n in args.filter_trait]
        settings = ScreenSettings(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                                  batch_size=args.batch_size, top_k=args.top_k, compiled=args.compiled,
                                  layers={v.name: args.layer for v in vectors} if args.layer else None)
        result = screen_dataset(dataset, vectors, model, args.out, settings, restart=args.restart,
                                skip_malformed=args.skip_malformed, progress=not args.quiet,
                                filters=FilterSpec(args.filter_top, args.filter_above, filter_names))
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
    print(f"screened {summary['samples']} samples ({result.computed} computed in this run, "
          f"{summary['samples'] - result.computed} from the checkpoint) in {result.seconds:.1f} s{rate} "
          f"(+ {result.startup_seconds:.1f} s engine start)", file=sys.stderr)
    return 0


def add_shift_parser(sub) -> None:
    p = sub.add_parser(
        "shift", help="how far fine-tuning moved a model along persona vectors",
        description="Mean activation at the last prompt token (chat template) on each trait's evaluation "
        "questions, tuned model minus base model, projected on each vector at its layer and at every layer. "
        "Prints a table; writes shift.json, shift.csv, shift.md and shift.png.",
        allow_abbrev=False,
    )
    p.add_argument("--base", default=None, help="base model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--tuned", required=True, help="fine-tuned model folder, or a PEFT adapter folder on top of --base")
    _add_vector_options(p)
    p.add_argument("--questions", default=None, metavar="FILE",
                   help="questions to use for every vector, one per line (default: each trait's evaluation questions)")
    p.add_argument("--max-questions", type=int, default=None, help="use only the first N questions")
    p.add_argument("--out", default="shift-report", help="output folder (default: ./shift-report)")
    p.set_defaults(func=cmd_shift)


def _load_tuned(base_path: str, tuned: str):
    """A tuned model folder (path returned as is) or a PEFT adapter (loaded on the base)."""
    adapter = Path(tuned) / "adapter_config.json"
    if not adapter.is_file():
        from personavec_vllm.models import resolve_model

        return resolve_model(tuned)
    from peft import PeftModel

    model, _ = load_hf(base_path)
    return PeftModel.from_pretrained(model, tuned).eval()


def cmd_shift(args, extra) -> int:
    import sys

    from personavec_vllm.models import ModelUnavailableError, resolve_model

    prog = "personavec shift"
    try:
        vectors = load_vectors(args.vectors or _default_vectors(args.base), args.traits)
        base = resolve_model(args.base)
        questions = None
        if args.questions:
            questions = [q.strip() for q in Path(args.questions).read_text(encoding="utf-8").splitlines() if q.strip()]
            if not questions:
                raise ScreenError(f"{args.questions}: no questions")
        tuned = _load_tuned(base, args.tuned)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base)
        rows = measure_shift(base, tuned, vectors, tokenizer=tokenizer, questions=questions,
                             max_questions=args.max_questions,
                             layers={v.name: args.layer for v in vectors} if args.layer else None)
        files = write_shift_outputs(rows, args.out, base=str(base), tuned=str(args.tuned))
    except (FileNotFoundError, ScreenError, VectorFileError, ModelUnavailableError, ImportError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    print(shift_table(rows))
    print()
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0
