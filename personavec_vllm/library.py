"""Vector libraries: a directory of vector files, as a server serves it.

A library is re-read when its directory changes, keeps every version a request may still hold,
and is capped in size (see `VectorLibrary`). `load_vectors` is the one reader of vector files
and folders for the offline tools (screening, rules, the benchmark).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from personavec_vllm import config
from personavec_vllm.files import atomic_write_bytes
from personavec_vllm.vectors import NAME_RULE, PersonaVector, VectorFileError, is_valid_name, load_vector, parse_vector

logger = logging.getLogger(__name__)

# How long a library keeps a version that is no longer live, for requests admitted with it.
VERSION_RETENTION_S = 3600.0


def vector_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The vector files of a library folder: its top-level `*.safetensors`, sorted by name."""
    return sorted(Path(directory).glob("*.safetensors"))


def load_vectors(
    paths: Sequence[str | os.PathLike[str]],
    names: Sequence[str] | None = None,
    *,
    num_layers: int | None = None,
    hidden_size: int | None = None,
) -> list[PersonaVector]:
    """Vector files and/or library folders (each folder's top-level files), optionally only the
    vectors whose name (or else trait) is in `names`, in that order; checked against a model's
    shape when it is given."""
    found: dict[str, PersonaVector] = {}
    for spec in paths:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = vector_files(path)
            if not files:
                raise VectorFileError(f"{path}: no *.safetensors vector files in this folder")
        elif path.is_file():
            files = [path]
        else:
            raise VectorFileError(f"{path}: no such vector file or folder")
        for f in files:
            vector = load_vector(f)
            if num_layers is not None and hidden_size is not None:
                vector.check_fits(num_layers, hidden_size)
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


@dataclass(frozen=True)
class LibraryChange:
    """What one `VectorLibrary.refresh` found: names added, replaced and removed."""

    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


class LibraryFull(VectorFileError):
    """The library holds its maximum number of vectors."""


class VectorLibrary:
    """The vectors of one directory, checked against the served model's shape.

    The directory is re-read when it changes (at most once a second on the request path, at once
    after `install`/`remove`), so files added, replaced or removed by hand or by another process
    are picked up. A file that is broken at start-up stops the start; one that breaks later is
    left out (and listed in `problems`), never served, and never breaks the library for others.

    With `keep_versions` (the process that owns the directory: the API server), every version
    loaded is also kept for an hour after it stopped being live, in a versions store under the
    cache folder (`versions_dir`: a hard link where the filesystem allows, else a copy; never inside
    the library, which may be read-only package data): requests admitted with a version can still
    be served it after the file was replaced or deleted (`vector_at`).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None,
        num_layers: int,
        hidden_size: int,
        *,
        max_vectors: int | None = None,
        keep_versions: bool = False,
    ):
        self.directory = Path(directory) if directory else None
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.max_vectors = max_vectors
        self.keep_versions = keep_versions
        self.problems: dict[str, str] = {}
        # Called with every non-empty `LibraryChange` (e.g. to drop a removed vector's metrics).
        self.listeners: list[Callable[[LibraryChange], None]] = []
        self._vectors: dict[str, PersonaVector] = {}
        self._files: dict[str, tuple[int, int]] = {}  # name -> (mtime_ns, size) of the loaded file
        self._checked = 0.0
        self._refresh(strict=True)
        if max_vectors is not None and len(self._vectors) > max_vectors:
            raise LibraryFull(
                f"vector library {self.directory} holds {len(self._vectors)} vectors; at most {max_vectors} "
                "(PERSONAVEC_MAX_LIBRARY) can be served"
            )

    # ---- reading ------------------------------------------------------------------------
    def refresh(self) -> LibraryChange:
        """Re-read the directory now: load new or changed files, drop vectors whose file went."""
        return self._refresh(strict=False)

    def maybe_refresh(self, interval_s: float = 1.0) -> LibraryChange:
        """`refresh` at most once per `interval_s` (the request path calls this)."""
        if time.monotonic() - self._checked < interval_s:
            return LibraryChange()
        return self._refresh(strict=False)

    def _refresh(self, strict: bool) -> LibraryChange:
        self._checked = time.monotonic()
        if self.directory is None:
            return LibraryChange()
        if not self.directory.is_dir():
            if strict:
                raise VectorFileError(f"vector library {self.directory} is not a directory")
            logger.error("personavec: vector library %s is not a directory any more", self.directory)
            return LibraryChange()
        added: list[str] = []
        changed: list[str] = []
        seen: set[str] = set()
        for path in vector_files(self.directory):
            name = path.stem
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue  # removed while we listed
            seen.add(name)
            stamp = (stat.st_mtime_ns, stat.st_size)
            if self._files.get(name) == stamp:
                continue
            try:
                vector = load_vector(path)
                vector.check_fits(self.num_layers, self.hidden_size)
            except VectorFileError as exc:
                if strict:
                    raise
                if self.problems.get(name) != str(exc):
                    logger.error("personavec: leaving out vector file %s: %s", path, exc)
                self.problems[name] = str(exc)
                self._files[name] = stamp
                if self._vectors.pop(name, None) is not None:
                    changed.append(name)
                continue
            self.problems.pop(name, None)
            old = self._vectors.get(name)
            if old is None or old.version != vector.version:
                (added if old is None else changed).append(name)
            self._vectors[name] = vector
            self._files[name] = stamp
            if self.keep_versions:
                self._keep(path, vector)
        removed = sorted(set(self._vectors) - seen)
        for name in set(self._files) - seen:
            self._files.pop(name)
            self.problems.pop(name, None)
        for name in removed:
            del self._vectors[name]
        change = LibraryChange(tuple(added), tuple(changed), tuple(removed))
        if change:
            if self.keep_versions:
                self._forget_old_versions()
            for listener in self.listeners:
                listener(change)
        return change

    @property
    def versions_dir(self) -> Path:
        """The versions store of this library: one folder per library path, under the cache."""
        assert self.directory is not None
        key = hashlib.sha256(str(self.directory.resolve()).encode()).hexdigest()[:16]
        return config.cache_dir() / "library-versions" / key

    def _version_path(self, name: str, version: str) -> Path:
        return self.versions_dir / f"{name}.{version}.safetensors"

    def _keep(self, path: Path, vector: PersonaVector) -> None:
        kept = self._version_path(vector.name, vector.version)
        if kept.exists():
            return
        try:
            kept.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, kept)
            except FileExistsError:
                pass
            except OSError:  # another filesystem, or no hard links: a copy
                atomic_write_bytes(kept, path.read_bytes())
        except OSError as exc:
            logger.warning("personavec: cannot keep version %s of %s (%s)", vector.version, vector.name, exc)

    def _forget_old_versions(self) -> None:
        assert self.directory is not None
        live = {(v.name, v.version) for v in self._vectors.values()}
        cutoff = time.time() - VERSION_RETENTION_S
        for kept in self.versions_dir.glob("*.safetensors"):
            name, _, version = kept.stem.rpartition(".")
            try:
                if (name, version) not in live and kept.stat().st_ctime < cutoff:
                    kept.unlink()
            except OSError:
                pass

    def get(self, name: str) -> PersonaVector | None:
        self.maybe_refresh()
        return self._vectors.get(name)

    def vector_at(self, name: str, version: str) -> PersonaVector | None:
        """Vector `name` exactly at `version`: the live one, or a kept older one; None if gone."""
        vector = self._vectors.get(name)
        if vector is not None and vector.version == version:
            return vector
        self.refresh()
        vector = self._vectors.get(name)
        if vector is not None and vector.version == version:
            return vector
        if self.directory is None:
            return None
        kept = self._version_path(name, version)
        try:
            vector = load_vector(kept, name=name)
        except VectorFileError:
            return None
        return vector if vector.version == version else None

    def version(self, name: str) -> str | None:
        """Content version of the live vector `name` (None if there is none)."""
        vector = self._vectors.get(name)
        return None if vector is None else vector.version

    def names(self) -> list[str]:
        return sorted(self._vectors)

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def __len__(self) -> int:
        return len(self._vectors)

    # ---- changing -------------------------------------------------------------------------
    def add(self, vector: PersonaVector) -> None:
        """Add in memory only (offline use and tests); `install` persists."""
        vector.check_fits(self.num_layers, self.hidden_size)
        self._vectors[vector.name] = vector

    def install(self, name: str, data: bytes) -> PersonaVector:
        """Validate a vector file's bytes in memory, then write it into the directory as `name`
        (atomically). Raises `VectorFileError` (nothing written) or `LibraryFull`."""
        if self.directory is None:
            raise VectorFileError("the library has no directory to install into")
        if not is_valid_name(name):
            raise VectorFileError(f"vector name must be {NAME_RULE}")
        vector = parse_vector(data, name)
        vector.check_fits(self.num_layers, self.hidden_size)
        self.refresh()
        if name not in self._vectors and self.max_vectors is not None and len(self._vectors) >= self.max_vectors:
            raise LibraryFull(
                f"the vector library is full ({len(self._vectors)} of at most {self.max_vectors} vectors, "
                "PERSONAVEC_MAX_LIBRARY); delete one first"
            )
        atomic_write_bytes(self.directory / f"{name}.safetensors", data)
        self.refresh()
        return self._vectors.get(name, vector)

    def remove(self, name: str) -> bool:
        """Delete vector `name`'s file (requests holding its version keep it). False if absent."""
        if self.directory is None or name not in self._vectors:
            return False
        try:
            (self.directory / f"{name}.safetensors").unlink()
        except FileNotFoundError:
            pass
        self.refresh()
        return True
