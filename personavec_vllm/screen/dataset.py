"""Training datasets to screen: reading OpenAI `messages` JSONL, prompt/response JSONL or CSV,
keyed per sample, and writing subsets back in the same format."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from personavec_vllm.files import atomic_write_text

logger = logging.getLogger(__name__)


ROLES = ("system", "developer", "user", "assistant", "tool")


class ScreenError(RuntimeError):
    """Screening cannot go on (bad settings, a checkpoint from other settings, ...)."""


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
    if (
        isinstance(content, list)
        and content
        and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content)
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
        raise ValueError(
            f"{n} message{'s' if n != 1 else ''} after the last assistant message "
            f"(messages[{last}]); the response must be the last message"
        )
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
            raise MalformedInputError(
                path, [Malformed(1, "empty file; expected a header with prompt,response")]
            ) from None
        except csv.Error as exc:
            raise MalformedInputError(path, [Malformed(1, f"not valid CSV ({exc})")]) from None
        columns = {name.strip().lower(): i for i, name in enumerate(header)}
        missing = [c for c in ("prompt", "response") if c not in columns]
        if missing:
            raise MalformedInputError(
                path,
                [
                    Malformed(
                        1,
                        f"the header has no {' and no '.join(repr(m) for m in missing)} "
                        f"column (found {', '.join(header) or 'none'})",
                    )
                ],
            )
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
        text = "".join(f"{s.raw}\n" for s in samples)
    else:
        buf = io.StringIO(newline="")
        writer = csv.writer(buf, delimiter="\t" if dataset.path.suffix.lower() == ".tsv" else ",")
        writer.writerow(dataset.csv_header or [])
        writer.writerows(s.raw for s in samples)
        text = buf.getvalue()
    return atomic_write_text(path, text)
