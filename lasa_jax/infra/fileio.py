"""Files and folders that appear whole or not at all, on a local disk or in a bucket.

Every path goes through ``etils.epath`` (the library Orbax uses), so the workdir, the feature
cache, checkpoints and exports may be local paths or ``gs://`` URLs alike. ``as_path`` makes a
local path absolute and leaves a URL exactly as given: ``gs://b/x`` is never turned into a
local ``./gs:/b/x``.

Crash safety. A file is written under a temporary name and then published: on a local disk a
temporary file in the target's own folder renamed into place; in a bucket a local temporary
file uploaded as one object (an object store shows an upload only once it is complete). A
folder (an exported checkpoint, an SSI artifact) is filled in a staging folder
(``staged_dir``); locally it is renamed into place; in a bucket its files are uploaded with one
*commit file* (``config.json`` for a checkpoint) last, and a reader treats a folder without its
commit file as absent. A killed run therefore never leaves a truncated file that a rerun would
trust. What we create follows the process umask (``tempfile`` alone would make 0600 files and
0700 folders that other users of a shared run folder cannot read).

Also here: JSON/JSONL records, content hashes and the keyed array cache of the feature stages.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from etils import epath

from lasa_jax.errors import ArtifactError, ConfigError
from lasa_jax.infra import multihost

PathLike = str | os.PathLike


# ------------------------------------------------------------------------------ paths

def is_url(path: PathLike) -> bool:
    """True for ``scheme://...`` (gs://, s3://, ...), False for a local path."""
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """An ``epath.Path``: a local path made absolute (against the current folder, once, so every
    stage sees the same place), a URL kept exactly as given."""
    text = os.fspath(path)
    return epath.Path(text if is_url(text) else os.path.abspath(text))


def check_url(path: PathLike, field: str) -> None:
    """A ``ConfigError`` naming ``field`` when ``path`` is a URL this installation cannot open
    (``gs://`` needs ``gcsfs``, or TensorFlow's file system, which epath prefers when present)."""
    if not is_url(path):
        return
    scheme = os.fspath(path).split("://", 1)[0]
    if scheme == "gs" and importlib.util.find_spec("tensorflow") is not None:
        return
    import fsspec
    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"{field}={os.fspath(path)!r}: cannot open {scheme}:// paths here ({e}); "
                          "for gs:// install gcsfs (pip install -e '.[gcs]')") from None


def exists(path: PathLike) -> bool:
    return as_path(path).exists()


def read_bytes(path: PathLike) -> bytes:
    return as_path(path).read_bytes()


def read_text(path: PathLike) -> str:
    return as_path(path).read_text(encoding="utf-8")


def _download(src: PathLike, local: str) -> None:
    if not is_url(src):
        shutil.copyfile(os.fspath(src), local)
        return
    with as_path(src).open("rb") as fin, open(local, "wb") as fout:
        shutil.copyfileobj(fin, fout, 16 << 20)


def local_copy(src_dir: PathLike, names: Iterable[str], dst_dir: str) -> str:
    """Copy the files ``names`` that exist in ``src_dir`` (local or a URL) into the local folder
    ``dst_dir``; for libraries that read only local files (tokenizers)."""
    src = as_path(src_dir)
    for name in names:
        if (src / name).exists():
            _download(src / name, os.path.join(dst_dir, name))
    return dst_dir


# ------------------------------------------------------------------------------ permissions

def _umask() -> int:
    """The process umask, read without changing it where the kernel tells (Linux): the
    set-and-restore fallback would race with threads creating files (Orbax's async saves)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(path: str, folder: bool = False) -> None:
    """The mode a plain open/mkdir would give, for what ``tempfile`` (0600 files, 0700 folders)
    or a writer such as safetensors (0600) created."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


# ------------------------------------------------------------------------------ crash-safe writes

def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` writes the content into the local file ``tmp`` (same extension as ``path``,
    so writers that infer a format from the name work); it is then published to ``path`` (local
    or URL). The parent folder is created; on failure ``path`` is untouched."""
    text = os.fspath(path)
    name = os.path.basename(text.rstrip("/"))
    ext = os.path.splitext(name)[1]
    if is_url(text):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".tmp{ext}")
        os.close(fd)
        try:
            write(tmp)
            target = as_path(text)
            target.parent.mkdir(parents=True, exist_ok=True)
            # One upload: the object becomes visible only once it is complete.
            with open(tmp, "rb") as fin, target.open("wb") as fout:
                shutil.copyfileobj(fin, fout, 16 << 20)
        finally:
            os.remove(tmp)
        return
    text = os.path.abspath(text)
    parent = os.path.dirname(text)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{name}.", suffix=f".tmp{ext}")
    os.close(fd)
    try:
        write(tmp)
        _follow_umask(tmp)  # after the writer: some (safetensors) create 0600 files themselves
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, text)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


class StagedDir:
    """A local folder being filled for ``target``; see ``staged_dir``."""

    def __init__(self, target: str, commit_file: str):
        self.target, self.commit_file = target, commit_file
        self.remote = is_url(target)
        parent = tempfile.gettempdir() if self.remote else os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=parent)
        _follow_umask(self.path, folder=True)
        self._cleared = False

    def _clear_target(self) -> None:
        # The old folder's commit file goes first: from then on no reader trusts what is left.
        if self._cleared:
            return
        target = as_path(self.target)
        (target / self.commit_file).unlink(missing_ok=True)
        if target.exists():
            target.rmtree()
        target.mkdir(parents=True, exist_ok=True)
        self._cleared = True

    def flush(self, name: str) -> None:
        """Upload the finished file ``name`` (relative to ``path``) now and free its local space
        (a bucket target only; locally nothing moves before ``commit``). Never the commit file."""
        if not self.remote or name == self.commit_file:
            return
        self._clear_target()
        local = os.path.join(self.path, name)
        dst = as_path(self.target) / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(local, "rb") as fin, dst.open("wb") as fout:
            shutil.copyfileobj(fin, fout, 16 << 20)
        os.remove(local)

    def commit(self) -> None:
        if not os.path.exists(os.path.join(self.path, self.commit_file)):
            raise AssertionError(f"staged folder for {self.target} has no {self.commit_file}")
        if not self.remote:
            for root, dirs, files in os.walk(self.path):
                for name in dirs:
                    _follow_umask(os.path.join(root, name), folder=True)
                for name in files:
                    _follow_umask(os.path.join(root, name))
            publish_dir(self.path, self.target)
            return
        for root, _, files in os.walk(self.path):
            for name in sorted(files):
                self.flush(os.path.relpath(os.path.join(root, name), self.path))
        self._clear_target()
        atomic_write(as_path(self.target) / self.commit_file,
                     lambda tmp: shutil.copyfile(os.path.join(self.path, self.commit_file), tmp))
        shutil.rmtree(self.path)


def publish_dir(tmp: str, out: str) -> str:
    """Move a fully written local folder ``tmp`` to ``out`` (same file system), replacing an
    older ``out``: the old folder is renamed aside first and removed only once the new one is in
    place, so no moment leaves neither."""
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".old", dir=os.path.dirname(out) or ".")
        os.replace(out, os.path.join(old, "previous"))
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)
    return out


@contextlib.contextmanager
def staged_dir(target: PathLike, commit_file: str) -> Iterator[StagedDir]:
    """Fill ``stage.path`` (a local folder) and it becomes ``target`` (local or a URL),
    replacing an older one, when the block ends without an error. ``commit_file`` must be among
    the files; in a bucket it is uploaded last, so its presence means the folder is complete."""
    stage = StagedDir(os.fspath(as_path(target)), commit_file)
    try:
        yield stage
        stage.commit()
    finally:
        if os.path.exists(stage.path):
            shutil.rmtree(stage.path)


# ------------------------------------------------------------------------------ records

def write_json(path: PathLike, obj: Any) -> None:
    """Pretty JSON, non-ASCII kept readable, written atomically."""
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def read_json(path: PathLike, what: str = "file") -> Any:
    """A JSON file written by a stage; a missing or malformed one is an ``ArtifactError`` naming it."""
    try:
        return json.loads(read_text(path))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: {what} is not valid JSON ({e})") from None


def write_jsonl(path: PathLike, records: Iterable[Mapping[str, Any]]) -> None:
    """One JSON object per line, UTF-8, non-ASCII kept readable; written atomically."""
    lines = []
    for i, rec in enumerate(records):
        try:
            lines.append(json.dumps(rec, ensure_ascii=False))
        except (TypeError, ValueError) as e:
            raise ValueError(f"write_jsonl {path}: record {i} is not JSON-serialisable: {e}") from None
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_jsonl(path: PathLike) -> list[dict[str, Any]]:
    """Records of a JSONL file; blank lines skipped; a bad line is an error naming file and line."""
    out = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
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


def file_hash(*paths: PathLike) -> str:
    """sha256 of the files' contents (in order), 16 hex digits."""
    h = hashlib.sha256()
    for p in paths:
        with as_path(p).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def digest(*parts: Any) -> str:
    """16 hex digits identifying ``parts`` (arrays by their bytes, anything else as sorted JSON)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def save_npz(path: PathLike, **arrays: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)
    atomic_write(path, write)


def load_arrays(path: PathLike) -> Any:
    """``np.load`` (no pickle) of a local or remote .npy / .npz file; .npz as a plain dict."""
    with as_path(path).open("rb") as f:
        loaded = np.load(f, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:
            return {k: loaded[k] for k in loaded.files}


def cached_array(cache_dir: PathLike | None, key_parts: dict, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Load an array from ``cache_dir`` if an entry for exactly these key parts exists, else
    compute it and store it (atomically, with the key parts beside it as JSON). ``key_parts``
    must name everything the array depends on.

    On several processes: process 0 decides whether the entry exists (so all of them either read
    it or all run ``compute``, whose collectives need everyone) and alone writes it."""
    if not cache_dir:
        return compute()
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
    path = as_path(cache_dir) / f"features-{key}.npy"

    def readable() -> bool:
        if not path.exists():
            return False
        try:
            load_arrays(path)
            return True
        except (ValueError, OSError, EOFError) as e:  # damaged after it was written: recompute
            logging.getLogger("lasa_jax").warning("%s: unreadable cache entry (%s); recomputing it", path, e)
            return False

    if multihost.broadcast(readable() if multihost.is_primary() else None):
        return load_arrays(path)
    value = compute()
    if multihost.is_primary():
        def write(tmp):
            with open(tmp, "wb") as f:
                np.save(f, value, allow_pickle=False)
        atomic_write(path, write)
        atomic_write_text(as_path(cache_dir) / f"features-{key}.json",
                          json.dumps(key_parts, indent=2, sort_keys=True))
    return value
