"""Crash-safe writes: a file or directory appears whole or not at all.

Everything a stage leaves for the next one (reports, artifacts, caches, exported checkpoints) is
written under a temporary name in the target's own folder and renamed into place, so a killed
run never leaves a truncated file that a rerun would trust.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable


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
