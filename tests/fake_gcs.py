"""A stand-in for Google Cloud Storage without a network: an fsspec file system registered for
the ``gs``/``gcs`` protocols whose objects live under a local folder (``FakeGCS.root``), so
``etils.epath`` (and therefore lasa_jax.infra.fileio) serves ``gs://bucket/x`` from
``root/bucket/x``. Like a bucket it cannot append to an object, and it needs no folders.

Orbax writes array data through TensorStore's own GCS driver, which this does not reach; tests
check that Orbax is handed the URL unchanged instead.
"""
from __future__ import annotations

import contextlib
import os
import sys

import fsspec
from etils.epath import backend as epath_backend
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import stringify_path

PREFIXES = ("gs://", "gcs://")


class FakeGCS(LocalFileSystem):
    protocol = ("gs", "gcs")
    root = ""  # set by ``installed``
    opened: list[tuple[str, str]] = []  # (mode, "gs://..." path) of every open, in order

    def __init__(self, *args, **kwargs):
        kwargs.pop("finalize_on_close", None)  # a gcsfs option epath passes
        super().__init__(auto_mkdir=True)

    @classmethod
    def _strip_protocol(cls, path):
        path = stringify_path(path)
        for prefix in PREFIXES:
            if path.startswith(prefix):
                return os.path.join(cls.root, path[len(prefix):]).rstrip("/")
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode or "+" in mode:
            raise NotImplementedError(f"fake GCS: an object cannot be opened with mode {mode!r}")
        rel = os.path.relpath(self._strip_protocol(path), self.root)
        FakeGCS.opened.append((mode, "gs://" + rel))
        return super()._open(path, mode=mode, **kwargs)


@contextlib.contextmanager
def installed(root: str):
    """Serve gs:// from ``root`` for the duration of the block."""
    # fsspec can register a protocol but not unregister one: restore its table by hand.
    table = sys.modules["fsspec.registry"]._registry  # noqa: SLF001
    saved = {p: table.get(p) for p in FakeGCS.protocol}
    FakeGCS.root, FakeGCS.opened = str(root), []
    for p in FakeGCS.protocol:
        fsspec.register_implementation(p, FakeGCS, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches one fs per protocol
    try:
        yield FakeGCS
    finally:
        for p, cls in saved.items():
            if cls is None:
                table.pop(p, None)
            else:
                table[p] = cls
        epath_backend.fsspec_backend._get_filesystem.cache_clear()
