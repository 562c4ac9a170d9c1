"""The screening checkpoint: finished batches appended to `OUT/checkpoint.jsonl`, so that a
re-run resumes where it stopped and writes the same files as an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from personavec_vllm.screen.dataset import ScreenError
from personavec_vllm.vectors import PersonaVector

CHECKPOINT_NAME = "checkpoint.jsonl"
CHECKPOINT_VERSION = 1

logger = logging.getLogger(__name__)


def _vector_fingerprint(vector: PersonaVector) -> str:
    return hashlib.sha256(vector.vectors.contiguous().numpy().tobytes()).hexdigest()[:16]


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
            diff = [
                f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
                for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)
            ]
            raise ScreenError(
                f"{self.path} was written with other settings ({'; '.join(diff)}); "
                "pass the same settings to resume, or --restart to start over"
            )
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
