"""The file layer under the readers: what a data path may name, and its records.

A data path (every ``config.data.*`` field, every reader's ``path`` argument) is one or more
comma-separated *specs*; each spec is one of

- a local file: ``.json`` (a list of records), ``.jsonl``, ``.csv`` (read by our own parsers, so
  an error names the line), ``.parquet`` or ``.arrow`` (read through ``datasets``);
- a directory written by ``datasets``' ``save_to_disk``;
- a glob (``data/ssi/*.json``), expanded in sorted order; it must match something;
- a path holding ``{lang}``, expanded over the run's languages (``data.languages``); for each
  language the code itself is tried first, then its legacy spellings (Javanese files are
  ``_jw`` in the authors' data: ``monolingual_first1000_{lang}.json`` finds ``..._jw.json`` for
  ``jv``), and the records' language defaults to that language;
- ``hf:NAME[:CONFIG][@SPLIT]``: ``datasets.load_dataset(NAME, CONFIG, split=SPLIT)``; NAME is a
  hub id (resolved from the local datasets cache when offline, else a one-line error) or a local
  dataset repository directory. A dataset with several splits needs ``@SPLIT``.

Any spec may end in ``#field=column&field=column`` to read a record's ``field`` from another
column (``hf:ToxicityPrompts/XSafety@test#prompt=text``). ``fixtures:NAME`` names a file shipped
in lasa_jax/data/fixtures and ``model:NAME`` a file inside the model directory.

Records come out as ``(where, dict)``: ``where`` is a line number (CSV, JSONL, malformed JSON),
``record N`` (JSON list) or ``row N`` (datasets), and errors are ``DataError``s naming the spec.
Nothing here needs a model, so a preflight can read every configured input first.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import os
from typing import Any, Iterator, Sequence

from lasa_jax.data.languages import legacy_codes
from lasa_jax.errors import DataError
from lasa_jax.infra import fileio

FIXTURES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
FIXTURE_PREFIX = "fixtures:"
MODEL_PREFIX = "model:"
HUB_PREFIX = "hf:"
LANG_FIELD = "{lang}"

_TEXT_KINDS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv"}
_COLUMNAR_KINDS = {".parquet": "parquet", ".arrow": "arrow"}
_GLOB_CHARS = "*?["


@dataclasses.dataclass(frozen=True)
class Source:
    """One resolved input: a local file or directory, or a hub dataset."""

    spec: str  # what errors name: the path, or "hf:..." as written
    kind: str  # json | jsonl | csv | parquet | arrow | saved | hub
    path: str  # local path, or the dataset name for kind "hub"
    config: str | None = None
    split: str | None = None
    columns: tuple[tuple[str, str], ...] = ()  # (field, column)
    language: str | None = None  # from {lang} expansion: the records' default language


# ---------------------------------------------------------------------------------------------
# specs -> sources


def split_specs(text: str) -> list[str]:
    """The comma-separated specs of a data path (empty pieces dropped)."""
    return [s.strip() for s in str(text).split(",") if s.strip()]


def _split_columns(spec: str, field: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    if "#" not in spec:
        return spec, ()
    base, _, mapping = spec.partition("#")
    pairs = []
    for part in mapping.split("&"):
        name, sep, column = part.partition("=")
        if not sep or not name.strip() or not column.strip():
            raise DataError(spec, None, field, f"column mapping {part!r} is not FIELD=COLUMN")
        pairs.append((name.strip(), column.strip()))
    return base, tuple(pairs)


def _parse_hub(spec: str, base: str, columns, field: str) -> Source:
    name = base[len(HUB_PREFIX):]
    split = None
    if "@" in name:
        name, _, split = name.rpartition("@")
    config = None
    # A config follows the last ':' of the name, unless that ':' belongs to a local path
    # ("hf:/data/x" never has one; Windows drive letters are not supported).
    if ":" in name:
        name, _, config = name.rpartition(":")
    if not name or (split is not None and not split) or (config is not None and not config):
        raise DataError(spec, None, field, "expected hf:NAME[:CONFIG][@SPLIT]")
    return Source(spec=spec, kind="hub", path=name, config=config, split=split, columns=columns)


def _kind_of(path: str, spec: str, field: str) -> str:
    if fileio.as_path(path).is_dir():
        return "saved"
    ext = os.path.splitext(path)[1].lower()
    kind = _TEXT_KINDS.get(ext) or _COLUMNAR_KINDS.get(ext)
    if kind is None:
        known = ", ".join(list(_TEXT_KINDS) + list(_COLUMNAR_KINDS))
        raise DataError(path, None, "file", f"unsupported extension {ext!r} (expected {known}, a directory "
                                            f"saved by datasets, or {HUB_PREFIX}NAME)")
    return kind


def local_path(base: str, model_path: str = "", field: str = "file") -> str:
    """A local spec without its `fixtures:`/`model:` prefix."""
    if base.startswith(FIXTURE_PREFIX):
        return os.path.join(FIXTURES_DIR, base[len(FIXTURE_PREFIX):])
    if base.startswith(MODEL_PREFIX):
        if not model_path:
            raise DataError(base, None, field, "is relative to config.model.path, which is empty")
        rel = base[len(MODEL_PREFIX):]
        return f"{model_path.rstrip('/')}/{rel}" if fileio.is_url(model_path) else os.path.join(model_path, rel)
    return base if fileio.is_url(base) else os.path.expanduser(base)


def _lang_candidates(path: str, lang: str) -> list[str]:
    return [path.replace(LANG_FIELD, code) for code in (lang, *legacy_codes(lang))]


def resolve(text: str, *, languages: Sequence[str] | None = None, model_path: str = "",
            field: str = "file") -> list[Source]:
    """The sources a data path names, in order. Missing files, empty globs and a ``{lang}``
    without languages are DataErrors naming the spec; nothing is read yet."""
    specs = split_specs(text)
    if not specs:
        raise DataError(str(text), None, field, "no data path given")
    out: list[Source] = []
    for spec in specs:
        base, columns = _split_columns(spec, field)
        if base.startswith(HUB_PREFIX):
            out.append(_parse_hub(spec, base, columns, field))
            continue
        path = local_path(base, model_path, field)
        if LANG_FIELD in path:
            if not languages:
                raise DataError(spec, None, field, f"{LANG_FIELD} in a path needs the run's languages")
            for lang in languages:
                found = [p for p in _lang_candidates(path, lang) if fileio.exists(p)]
                if not found:
                    tried = " or ".join(_lang_candidates(path, lang))
                    raise DataError(tried, None, field, f"not found (language {lang!r})")
                if len(found) > 1:
                    raise DataError(found[0], None, field, f"language {lang!r} matches two files: {found}")
                out.append(Source(spec=found[0], kind=_kind_of(found[0], spec, field), path=found[0],
                                  columns=columns, language=lang))
            continue
        if any(ch in path for ch in _GLOB_CHARS):
            matches = sorted(glob.glob(path))
            if not matches:
                raise DataError(path, None, field, "no file matches this pattern")
            out.extend(Source(spec=m, kind=_kind_of(m, spec, field), path=m, columns=columns) for m in matches)
            continue
        if not fileio.exists(path):
            raise DataError(path, None, field, "not found" if field == "file" else "data file not found")
        out.append(Source(spec=path, kind=_kind_of(path, spec, field), path=path, columns=columns))
    return out


def as_sources(path: "str | os.PathLike | Source | Sequence[Source]", *, languages=None, model_path: str = "",
               field: str = "file") -> list[Source]:
    """Readers take a path (any spec above), a Source or a list of Sources."""
    if isinstance(path, Source):
        return [path]
    if isinstance(path, (list, tuple)) and all(isinstance(s, Source) for s in path):
        return list(path)
    return resolve(os.fspath(path), languages=languages, model_path=model_path, field=field)


# ---------------------------------------------------------------------------------------------
# sources -> records


def read_text(path: str) -> str:
    """A UTF-8 file, local or a URL such as gs:// (a leading byte-order mark dropped), with
    located errors."""
    where = fileio.as_path(path)
    if not where.exists():
        raise DataError(path, None, "file", "not found")
    if where.is_dir():
        raise DataError(path, None, "file", "not a regular file")
    raw = where.read_bytes()
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(path, line, "encoding", f"not valid UTF-8 (byte {e.start})") from None


def _json_records(path: str, kind: str) -> list[tuple[str, Any]]:
    text = read_text(path)
    if kind == "jsonl":
        # Parse every line before yielding any, so a syntax error is reported before content
        # errors, as for .json. split("\n"), not splitlines(): JSON strings may hold U+2028;
        # a CRLF line keeps its "\r", which JSON reads as whitespace.
        records = []
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append((str(lineno), json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(path, lineno, "json", f"malformed JSON: {e.msg} (column {e.colno})") from None
        if not records:
            raise DataError(path, None, "file", "no records")
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (one record per line? name the file .jsonl)" if e.msg == "Extra data" else ""
        raise DataError(path, e.lineno, "json", f"malformed JSON: {e.msg} (column {e.colno}){hint}") from None
    if not isinstance(data, list):
        raise DataError(path, None, "(root)", f"expected a JSON list of records, got {type(data).__name__}")
    if not data:
        raise DataError(path, None, "file", "no records")
    return [(f"record {i}", r) for i, r in enumerate(data)]


def csv_rows(path: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(header, [(line, cells)]) of a CSV file; blank rows skipped, cell counts checked."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataError(path, None, "file", "empty CSV") from None
    except csv.Error as e:
        raise DataError(path, 1, "csv", f"malformed CSV: {e}") from None
    rows = []
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(path, reader.line_num, "csv", f"malformed CSV: {e}") from None
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataError(path, start, "(row)", f"{len(row)} cells but the header has {len(header)} columns")
        rows.append((str(start), row))
    if not rows:
        raise DataError(path, None, "file", "no records")
    return header, rows


def _csv_records(path: str) -> list[tuple[str, dict]]:
    header, rows = csv_rows(path)
    seen = set()
    for name in header:
        if name in seen:
            raise DataError(path, 1, "header", f"column {name!r} appears twice")
        seen.add(name)
    # An empty cell is a missing value, as in a JSON record without the field.
    return [(line, {h: (c if c.strip() else None) for h, c in zip(header, cells)}) for line, cells in rows]


def load_dataset(source: Source):
    """The ``datasets.Dataset`` of a columnar, saved or hub source (one split)."""
    import datasets

    spec = source.spec
    try:
        if source.kind == "arrow":
            ds = datasets.Dataset.from_file(source.path)
        elif source.kind == "parquet":
            ds = datasets.load_dataset("parquet", data_files=[source.path], split="train")
        elif source.kind == "saved":
            if not any(os.path.exists(os.path.join(source.path, f)) for f in ("state.json", "dataset_dict.json")):
                raise DataError(spec, None, "file", "a directory that datasets did not save (save_to_disk); "
                                                    f"to load it as a dataset repository write {HUB_PREFIX}{spec}")
            ds = datasets.load_from_disk(source.path)
        else:
            ds = datasets.load_dataset(source.path, source.config, split=source.split)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "cannot load this input"
        first = (str(e).strip().splitlines() or [""])[0]
        raise DataError(spec, None, "dataset", f"cannot load ({type(e).__name__}: {first})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if source.split is not None:
            if source.split not in ds:
                raise DataError(spec, None, "split", f"no split {source.split!r} (splits: {splits})")
            ds = ds[source.split]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise DataError(spec, None, "split", f"the dataset has several splits {splits}; name one with @SPLIT")
    if len(ds) == 0:
        raise DataError(spec, None, "file", "no records")
    return ds


def _dataset_records(source: Source) -> Iterator[tuple[str, dict]]:
    ds = load_dataset(source)
    for i, row in enumerate(ds):
        yield f"row {i}", row


def records(source: Source) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for every record of one source, its column mapping applied."""
    if source.kind in ("json", "jsonl"):
        it: Any = _json_records(source.path, source.kind)
    elif source.kind == "csv":
        it = _csv_records(source.path)
    else:
        it = _dataset_records(source)
    if not source.columns:
        yield from it
        return
    first = True
    for where, rec in it:
        if isinstance(rec, dict):
            if first:
                missing = [c for _, c in source.columns if c not in rec]
                if missing:
                    raise DataError(source.spec, None, "columns",
                                    f"no column {missing[0]!r} (columns: {sorted(rec)})")
                first = False
            rec = dict(rec)
            for name, column in source.columns:
                rec[name] = rec.pop(column) if column != name else rec[column]
        yield where, rec


__all__ = ["FIXTURES_DIR", "HUB_PREFIX", "LANG_FIELD", "Source", "as_sources", "csv_rows", "load_dataset", "local_path",
           "read_text", "records", "resolve", "split_specs"]
