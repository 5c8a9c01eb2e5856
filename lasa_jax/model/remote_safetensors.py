"""Safetensors files read by byte range from a URL (``gs://...``): checkpoints in a bucket.

The safetensors library maps local files only. Its format is simple and safe to parse: an
8-byte little-endian header length, a JSON header giving each tensor's dtype, shape and byte
range, then the raw little-endian data. A tensor slice is read here as the byte range of the
leading-axis rows it covers, so a process still fetches only the rows its devices hold (plus
the columns of those rows it then drops). The interface is the part of ``safe_open`` that
``lasa_jax.model.checkpoint`` uses: ``keys()``, ``get_slice(name)`` with ``get_shape()``,
``get_dtype()`` and basic slicing.
"""
from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np

from lasa_jax.errors import CheckpointError
from lasa_jax.infra.fileio import as_path

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}
_MAX_HEADER = 100 << 20  # the safetensors library's own limit


def read_header(f, path: str, size: int) -> tuple[int, dict]:
    """(offset of the data section, {name: entry}) from an open file, every entry checked."""
    raw = _read_exactly(f, 0, 8, path)
    n = int.from_bytes(raw, "little")
    if not 0 < n <= min(_MAX_HEADER, size - 8):
        raise CheckpointError(f"{path}: not a safetensors file (header length {n}, file size {size})")
    try:
        header = json.loads(_read_exactly(f, 8, n, path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    start, data_size = 8 + n, size - 8 - n
    for name, e in header.items():
        ok = (isinstance(e, dict) and e.get("dtype") in DTYPES and isinstance(e.get("shape"), list)
              and all(isinstance(d, int) and d >= 0 for d in e["shape"])
              and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2)
        if ok:
            b, end = e["data_offsets"]
            nbytes = math.prod(e["shape"]) * np.dtype(DTYPES[e["dtype"]]).itemsize
            ok = isinstance(b, int) and isinstance(end, int) and 0 <= b <= end <= data_size and end - b == nbytes
        if not ok:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {e!r}")
    return start, header


def _read_exactly(f, offset: int, n: int, path: str) -> bytes:
    f.seek(offset)
    data = f.read(n)
    if len(data) != n:
        raise CheckpointError(f"{path}: truncated (wanted {n} bytes at offset {offset}, got {len(data)})")
    return data


class RemoteSafetensors:
    """One safetensors file at a URL, opened for slice reads (a context manager like ``safe_open``).
    ``header`` (from an earlier ``read_header``) skips reading it again."""

    def __init__(self, path: str, header: tuple[int, dict] | None = None):
        self.path = path
        self._file = as_path(path).open("rb")
        try:
            self.start, self.entries = header or read_header(self._file, path, as_path(path).stat().length)
        except BaseException:
            self._file.close()
            raise

    def keys(self) -> list[str]:
        return list(self.entries)

    def get_slice(self, name: str) -> "_TensorSlice":
        return _TensorSlice(self, name, self.entries[name])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RemoteSafetensors":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _TensorSlice:
    def __init__(self, owner: RemoteSafetensors, name: str, entry: dict):
        self.owner, self.name = owner, name
        self.shape = tuple(entry["shape"])
        self.dtype_name = entry["dtype"]
        self.dtype = np.dtype(DTYPES[self.dtype_name]).newbyteorder("<")
        self.offset = owner.start + entry["data_offsets"][0]

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def get_dtype(self) -> str:
        return self.dtype_name

    def __getitem__(self, idx) -> np.ndarray:
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(idx) > len(self.shape):
            raise IndexError(f"{self.name}: {len(idx)} indices for shape {self.shape}")
        if not self.shape:
            return self._rows(0, 1).reshape(())
        first = idx[0] if idx else slice(None)
        if isinstance(first, int):
            first = slice(first % self.shape[0], first % self.shape[0] + 1)
            rest = (0,) + tuple(idx[1:])
        else:
            rest = (slice(None),) + tuple(idx[1:])
        start, stop, step = first.indices(self.shape[0])
        if step != 1:
            raise IndexError(f"{self.name}: only contiguous slices are supported")
        rows = self._rows(start, max(stop, start))
        return np.array(rows[rest], dtype=self.dtype.newbyteorder("="))

    def _rows(self, start: int, stop: int) -> np.ndarray:
        row_items = math.prod(self.shape[1:])
        row_bytes = row_items * self.dtype.itemsize
        data = _read_exactly(self.owner._file, self.offset + start * row_bytes, (stop - start) * row_bytes,
                             self.owner.path)
        return np.frombuffer(data, self.dtype).reshape((stop - start,) + self.shape[1:])
