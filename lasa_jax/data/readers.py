"""Readers for the prompt files LASA consumes: parallel queries, SSI prompts and KTO pairs.

Formats (all local, UTF-8):
- MultiJail CSV: columns `id, source, tags, en, zh, it, vi, ar, ko, th, bn, sw, jv`; any column
  whose name is a language label counts as a language, other extra columns are ignored; an
  optional `harmful` column (1/0, true/false, yes/no, empty = unknown).
- The authors' JSON: parallel `{idx, original_query, translations: {Chinese: ..., ...}}`
  (original_query is English); SSI prompts `{prompt, language, source, idx}`; KTO pairs
  `{prompt, chosen, rejected, source}` (+ optional `language`, `harmful`, `idx`).
- JSONL: one record per line, the same fields; for parallel files also `{id, texts: {lang: text},
  harmful?, source?}`. JSON files may hold either parallel shape too.

Every problem is a `DataError` whose message is one line `"<file>:<where>: <field>: <problem>"`;
`<where>` is a line number (CSV, JSONL, malformed JSON), `record N` (0-based position in a JSON
list) or `-` for the file as a whole.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from typing import Any, Iterable, Iterator, Sequence

from lasa_jax.data.languages import MULTIJAIL_LANGUAGES, normalize_language
from lasa_jax.errors import DataError, UnknownLanguage
from lasa_jax.infra import fileio

FIXTURES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")

# `source` values that mean "harmful" when a record carries no explicit label: "safety" is the
# authors' default for their translated safety data, "harmbench" and "multijail" the benchmarks
# it is built from, "harmful"/"unsafe" the plain words. Benign counterparts: the authors'
# UltraFeedback data and the "general" source of their KTO mix.
DEFAULT_HARMFUL_SOURCES = frozenset({"harmful", "unsafe", "safety", "harmbench", "multijail"})
DEFAULT_BENIGN_SOURCES = frozenset({"benign", "harmless", "safe", "general", "ultrafeedback"})

_CSV_META_COLUMNS = ("id", "source", "tags", "harmful")
_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}


@dataclasses.dataclass(frozen=True)
class ParallelQuery:
    """One query in several languages. `texts` maps ISO code -> text, in MultiJail order."""

    qid: str
    texts: dict[str, str]
    harmful: bool | None = None
    source: str = ""


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str
    language: str
    harmful: bool
    source: str
    idx: str


@dataclasses.dataclass(frozen=True)
class KTOPair:
    prompt: str
    chosen: str
    rejected: str
    source: str
    idx: str
    language: str | None = None
    harmful: bool | None = None


# ---------------------------------------------------------------------------------------------
# Low-level file access


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_text(path: str) -> str:
    """A local file's or a URL's (``gs://``) text."""
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


def _iter_records(path: str) -> Iterator[tuple[str, Any]]:
    """Yield (where, record) for a .json list or a .jsonl file."""
    ext = os.path.splitext(path)[1].lower()
    text = _read_text(path)
    if ext == ".jsonl":
        # Parse every line before yielding any, so a syntax error is reported before content
        # errors, as for .json. split("\n"), not splitlines(): JSON strings may hold U+2028.
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
        yield from records
    elif ext == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            hint = " (one record per line? name the file .jsonl)" if e.msg == "Extra data" else ""
            raise DataError(path, e.lineno, "json", f"malformed JSON: {e.msg} (column {e.colno}){hint}") from None
        if not isinstance(data, list):
            raise DataError(path, None, "(root)", f"expected a JSON list of records, got {type(data).__name__}")
        if not data:
            raise DataError(path, None, "file", "no records")
        for i, record in enumerate(data):
            yield f"record {i}", record
    else:
        raise DataError(path, None, "file", f"unsupported extension {ext!r} (expected .json or .jsonl)")


class _Record:
    """Typed field access on one JSON record, raising located DataErrors."""

    def __init__(self, path: str, where: str, record: Any):
        if not isinstance(record, dict):
            raise DataError(path, where, "(record)", f"expected a JSON object, got {type(record).__name__}")
        self.path, self.where, self.data = path, where, record

    def error(self, field: str, problem: str) -> DataError:
        return DataError(self.path, self.where, field, problem)

    def has(self, field: str) -> bool:
        return self.data.get(field) is not None

    def text(self, field: str, value: Any = None, *, required: bool = True) -> str | None:
        """A string field that must hold more than whitespace (prompts, completions)."""
        if value is None:
            value = self.data.get(field)
        if value is None:
            if required:
                raise self.error(field, "missing required field")
            return None
        if not isinstance(value, str):
            raise self.error(field, f"expected a string, got {type(value).__name__} {_short(value)}")
        if not value.strip():
            raise self.error(field, "empty or whitespace-only text")
        return value

    def ident(self, field: str, default: str | None = None) -> str:
        value = self.data.get(field)
        if value is None:
            if default is None:
                raise self.error(field, "missing required field")
            return default
        # bool is an int subclass; an id of `true` is a mistake, not the number 1.
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise self.error(field, f"expected an integer or string id, got {type(value).__name__} {_short(value)}")
        value = str(value).strip()
        if not value:
            raise self.error(field, "empty id")
        return value

    def label(self, field: str) -> bool | None:
        value = self.data.get(field)
        if value is None:
            return None
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise self.error(field, f"unknown label {_short(value)} (expected true/false or 1/0)")

    def language(self, field: str, value: Any, extra: Iterable[str]) -> str:
        try:
            return normalize_language(value, extra)
        except UnknownLanguage as e:
            raise self.error(field, str(e)) from None


def _check_unique(seen: dict, key: Any, path: str, where: str, field: str, shown: str) -> None:
    if key in seen:
        raise DataError(path, where, field, f"duplicate {shown} (first at {_where_phrase(seen[key])})")
    seen[key] = where


def _where_phrase(where: str) -> str:
    return where if where.startswith("record") else f"line {where}"


def _language_order(code: str) -> tuple[int, str]:
    return (MULTIJAIL_LANGUAGES.index(code), "") if code in MULTIJAIL_LANGUAGES else (len(MULTIJAIL_LANGUAGES), code)


# ---------------------------------------------------------------------------------------------
# Parallel queries


def read_parallel(
    path: str | os.PathLike,
    languages: Sequence[str] | None = None,
    *,
    extra_languages: Iterable[str] = (),
) -> list[ParallelQuery]:
    """Read parallel queries from a MultiJail CSV, the authors' JSON, or JSONL.

    `languages`: when given, every record must have a non-empty text in each of them (else a
    DataError naming the record and language) and the result keeps only those; when None, every
    language found is kept. `extra_languages` admits non-MultiJail ISO codes.
    """
    path = os.fspath(path)
    extra = tuple(extra_languages)
    wanted = None
    if languages is not None:
        try:
            wanted = [normalize_language(lang, extra) for lang in languages]
        except UnknownLanguage as e:
            raise DataError(path, None, "languages", str(e)) from None
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        queries = _read_parallel_csv(path, wanted, extra)
    elif ext in (".json", ".jsonl"):
        queries = []
        seen: dict = {}
        for where, raw in _iter_records(path):
            q = _parallel_record(_Record(path, where, raw), wanted, extra)
            _check_unique(seen, q.qid, path, where, "id", f"id {q.qid!r}")
            queries.append(q)
    else:
        raise DataError(path, None, "file", f"unsupported extension {ext!r} (expected .csv, .json or .jsonl)")
    return queries


def _select(texts: dict[str, str], wanted: list[str] | None, rec: _Record, field: str) -> dict[str, str]:
    if wanted is not None:
        for lang in wanted:
            if lang not in texts:
                raise rec.error(field, f"missing language {lang!r}")
        texts = {lang: texts[lang] for lang in wanted}
    return {lang: texts[lang] for lang in sorted(texts, key=_language_order)}


def _parallel_record(rec: _Record, wanted: list[str] | None, extra: tuple[str, ...]) -> ParallelQuery:
    texts: dict[str, str] = {}
    if "original_query" in rec.data or "translations" in rec.data:
        # The authors' shape: English original plus translations keyed by language name.
        qid = rec.ident("idx")
        texts["en"] = rec.text("original_query")
        table, table_name = rec.data.get("translations"), "translations"
    else:
        qid = rec.ident("id")
        table, table_name = rec.data.get("texts"), "texts"
    if table is None:
        raise rec.error(table_name, "missing required field")
    if not isinstance(table, dict):
        raise rec.error(table_name, f"expected an object of language -> text, got {type(table).__name__}")
    for key, value in table.items():
        field = f"{table_name}.{key}"
        lang = rec.language(field, key, extra)
        if lang in texts:
            raise rec.error(field, f"language {lang!r} given twice")
        texts[lang] = rec.text(field, value)
    if not texts:
        raise rec.error(table_name, "no texts")
    source = rec.data.get("source", "")
    if not isinstance(source, str):
        raise rec.error("source", f"expected a string, got {type(source).__name__}")
    texts = _select(texts, wanted, rec, table_name)
    return ParallelQuery(qid=qid, texts=texts, harmful=rec.label("harmful"), source=source)


def _read_parallel_csv(path: str, wanted: list[str] | None, extra: tuple[str, ...]) -> list[ParallelQuery]:
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(path, None, "file", "empty CSV") from None
    except csv.Error as e:
        raise DataError(path, 1, "csv", f"malformed CSV: {e}") from None
    header = [h.strip() for h in header]
    columns: dict[str, int] = {}
    lang_columns: dict[str, int] = {}
    for i, name in enumerate(header):
        key = name.lower()
        if key in _CSV_META_COLUMNS:
            if key in columns:
                raise DataError(path, 1, "header", f"column {name!r} appears twice")
            columns[key] = i
            continue
        try:
            lang = normalize_language(name, extra)
        except UnknownLanguage:
            continue  # MultiJail-style files carry extra columns (e.g. notes); not ours to judge.
        if lang in lang_columns:
            raise DataError(path, 1, "header", f"language {lang!r} has two columns ({header[lang_columns[lang]]!r}, {name!r})")
        lang_columns[lang] = i
    if "id" not in columns:
        raise DataError(path, 1, "header", "missing required column 'id'")
    if wanted is not None:
        for lang in wanted:
            if lang not in lang_columns:
                raise DataError(path, 1, "header", f"missing language column {lang!r}")
        lang_columns = {lang: lang_columns[lang] for lang in wanted}
    if not lang_columns:
        raise DataError(path, 1, "header", "no language columns (expected e.g. en, zh, ...)")

    queries: list[ParallelQuery] = []
    seen: dict = {}
    line = 1
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(path, reader.line_num, "csv", f"malformed CSV: {e}") from None
        line = start
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataError(path, line, "(row)", f"{len(row)} cells but the header has {len(header)} columns")
        record = {name: row[i] for name, i in columns.items()}
        rec = _Record(path, str(line), record)
        qid = rec.ident("id")
        texts = {lang: rec.text(header[i], row[i]) for lang, i in lang_columns.items()}
        harmful = rec.label("harmful") if record.get("harmful", "").strip() else None
        _check_unique(seen, qid, path, str(line), "id", f"id {qid!r}")
        texts = {lang: texts[lang] for lang in sorted(texts, key=_language_order)}
        queries.append(ParallelQuery(qid=qid, texts=texts, harmful=harmful, source=record.get("source", "").strip()))
    if not queries:
        raise DataError(path, None, "file", "no records")
    return queries


def parallel_to_prompts(
    queries: Iterable[ParallelQuery], harmful: bool | None = None, *, source: str | None = None
) -> list[Prompt]:
    """Flatten parallel queries into one Prompt per (query, language); idx = the query id.

    The label is `harmful` if given, else the query's own label; a query with neither, or whose
    own label contradicts `harmful`, is an error. `source` overrides the queries' source.
    """
    prompts = []
    for q in queries:
        if harmful is not None and q.harmful is not None and harmful != q.harmful:
            raise ValueError(f"query {q.qid!r}: harmful={harmful} given but the query is labelled harmful={q.harmful}")
        label = q.harmful if harmful is None else harmful
        if label is None:
            raise ValueError(f"query {q.qid!r}: no harmful label; pass harmful=True/False")
        src = q.source if source is None else source
        prompts.extend(Prompt(text=t, language=lang, harmful=label, source=src, idx=q.qid) for lang, t in q.texts.items())
    return prompts


# ---------------------------------------------------------------------------------------------
# SSI prompts and KTO pairs


def _harmful_label(rec: _Record, source: str | None, harmful_sources, benign_sources, default: bool | None) -> bool:
    explicit = rec.label("harmful")
    by_label = rec.label("label")
    if explicit is not None and by_label is not None and explicit != by_label:
        raise rec.error("label", f"label {rec.data['label']!r} contradicts harmful={explicit}")
    if explicit is not None:
        return explicit
    if by_label is not None:
        return by_label
    if source is not None:
        if source in harmful_sources:
            return True
        if source in benign_sources:
            return False
    if default is not None:
        return default
    # Guessing "benign" for an unrecognised source would quietly poison the probe's labels.
    raise rec.error(
        "harmful",
        f"no 'harmful' or 'label' field and source {source!r} is in neither the harmful "
        f"{sorted(harmful_sources)} nor the benign {sorted(benign_sources)} sources",
    )


def read_prompts(
    path: str | os.PathLike,
    harmful_sources: Iterable[str] = DEFAULT_HARMFUL_SOURCES,
    *,
    benign_sources: Iterable[str] = DEFAULT_BENIGN_SOURCES,
    language: str | None = None,
    harmful: bool | None = None,
    extra_languages: Iterable[str] = (),
) -> list[Prompt]:
    """Read SSI prompts `{prompt, language, source, idx}` from a JSON list or JSONL file.

    Label: an explicit `harmful` (bool) or `label` (0/1) field; else `source` in
    `harmful_sources` (harmful) or `benign_sources` (benign); else the `harmful` argument; else a
    DataError. `language` is the default for records without one (the authors' UltraFeedback
    files carry their language only in the file name); the authors' `lingual` field is read as
    an alias of `language`. A missing `idx` defaults to the record number.
    """
    path = os.fspath(path)
    harmful_sources, benign_sources = frozenset(harmful_sources), frozenset(benign_sources)
    extra = tuple(extra_languages)
    prompts: list[Prompt] = []
    seen: dict = {}
    for n, (where, raw) in enumerate(_iter_records(path)):
        rec = _Record(path, where, raw)
        text = rec.text("prompt")
        lang = _record_language(rec, language, extra, required=True)
        source = rec.data.get("source")
        if source is not None and not isinstance(source, str):
            raise rec.error("source", f"expected a string, got {type(source).__name__}")
        label = _harmful_label(rec, source, harmful_sources, benign_sources, harmful)
        idx = rec.ident("idx", default=str(n))
        _check_unique(seen, (source, idx, lang), path, where, "idx", f"(source, idx, language) = ({source!r}, {idx!r}, {lang!r})")
        prompts.append(Prompt(text=text, language=lang, harmful=label, source=source or "", idx=idx))
    return prompts


def _record_language(rec: _Record, default: str | None, extra: tuple[str, ...], required: bool) -> str | None:
    value, field = rec.data.get("language"), "language"
    alias = rec.data.get("lingual")
    if value is None and alias is not None:
        value, field = alias, "lingual"
    if value is None:
        value, field = default, "language"
        if value is None:
            if required:
                raise rec.error("language", "missing required field (or pass language=...)")
            return None
    lang = rec.language(field, value, extra)
    if field == "language" and alias is not None and rec.language("lingual", alias, extra) != lang:
        raise rec.error("lingual", f"{alias!r} contradicts language {value!r}")
    return lang


def read_kto_pairs(path: str | os.PathLike, *, extra_languages: Iterable[str] = ()) -> list[KTOPair]:
    """Read paired preference records `{prompt, chosen, rejected, source}` (+ optional
    `language`, `harmful`, `idx`; idx defaults to the record number) from JSON or JSONL."""
    path = os.fspath(path)
    extra = tuple(extra_languages)
    pairs: list[KTOPair] = []
    seen: dict = {}
    for n, (where, raw) in enumerate(_iter_records(path)):
        rec = _Record(path, where, raw)
        prompt, chosen, rejected = rec.text("prompt"), rec.text("chosen"), rec.text("rejected")
        source = rec.data.get("source")
        if source is None:
            raise rec.error("source", "missing required field")
        if not isinstance(source, str) or not source.strip():
            raise rec.error("source", f"expected a non-empty string, got {_short(source)}")
        lang = _record_language(rec, None, extra, required=False)
        idx = rec.ident("idx", default=str(n))
        _check_unique(seen, (source, idx, lang), path, where, "idx", f"(source, idx, language) = ({source!r}, {idx!r}, {lang!r})")
        pairs.append(
            KTOPair(prompt=prompt, chosen=chosen, rejected=rejected, source=source, idx=idx,
                    language=lang, harmful=rec.label("harmful"))
        )
    return pairs


__all__ = [
    "DEFAULT_BENIGN_SOURCES",
    "DEFAULT_HARMFUL_SOURCES",
    "FIXTURES_DIR",
    "DataError",
    "KTOPair",
    "ParallelQuery",
    "Prompt",
    "parallel_to_prompts",
    "read_kto_pairs",
    "read_parallel",
    "read_prompts",
]
