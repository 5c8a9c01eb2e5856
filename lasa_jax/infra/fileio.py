"""Crash-safe file I/O: a file or directory appears whole or not at all.

Everything a stage leaves for the next one (reports, artifacts, caches, exported checkpoints) is
written under a temporary name in the target's own folder and renamed into place, so a killed
run never leaves a truncated file that a rerun would trust. Also here: JSON/JSONL records, file
content hashes and the keyed array cache the feature stages use.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from lasa_jax.errors import ArtifactError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` writes the content; it is synced and renamed to ``path``. The parent
    folder is created; on failure the temporary file is removed and ``path`` is untouched."""
    path = os.fspath(path)
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def publish_dir(tmp: str, out: str) -> str:
    """Move a fully written directory ``tmp`` to ``out``, replacing an older ``out``."""
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Pretty JSON, non-ASCII kept readable, written atomically."""
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """A JSON file written by a stage; a missing or malformed one is an ``ArtifactError`` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: {what} is not valid JSON ({e})") from None


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> None:
    """One JSON object per line, UTF-8, non-ASCII kept readable; written atomically."""
    lines = []
    for i, rec in enumerate(records):
        try:
            lines.append(json.dumps(rec, ensure_ascii=False))
        except (TypeError, ValueError) as e:
            raise ValueError(f"write_jsonl {path}: record {i} is not JSON-serialisable: {e}") from None
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSONL file; blank lines skipped; a bad line is an error naming file and line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ArtifactError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ArtifactError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            out.append(rec)
    return out


def file_hash(*paths: str) -> str:
    """sha256 of the files' contents (in order), 16 hex digits."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def digest(*parts: Any) -> str:
    """16 hex digits identifying ``parts`` (arrays by their bytes, anything else as sorted JSON)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def cached_array(cache_dir: str | None, key_parts: dict, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Load an array from ``cache_dir`` if an entry for exactly these key parts exists, else
    compute it and store it (atomically, with the key parts beside it as JSON). ``key_parts``
    must name everything the array depends on."""
    if not cache_dir:
        return compute()
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
    path = os.path.join(cache_dir, f"features-{key}.npy")
    if os.path.exists(path):
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:  # damaged after it was written: recompute
            logging.getLogger("lasa_jax").warning("%s: unreadable cache entry (%s); recomputing it", path, e)
    value = compute()

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, value, allow_pickle=False)
    atomic_write(path, write)
    atomic_write_text(os.path.join(cache_dir, f"features-{key}.json"),
                      json.dumps(key_parts, indent=2, sort_keys=True))
    return value
