"""Readers for the prompt files LASA consumes: parallel queries, SSI prompts, KTO data and
evaluation prompts. Where the records come from (local JSON/JSONL/CSV/parquet/arrow, a
`datasets` directory, a hub id, several files, `{lang}` paths) is `lasa_jax.data.sources`;
this module validates the records, whatever their source.

Record shapes (the authors' files exactly as published included):
- parallel queries: the MultiJail CSV (`id, source, tags, en, zh, ...`; any column whose name is
  a language label counts as a language, other extra columns are ignored; an optional `harmful`
  column), the same wide rows from a dataset, the authors' `{idx, original_query,
  translations: {Chinese: ...}}` (original_query is English), or `{id, texts: {lang: text}}`;
- SSI prompts: `{prompt, language|lingual, source?, idx?}` with an optional label `harmful`,
  `label` (0/1) or `is_unsafe` (the authors' field); unlabelled files take their label from the
  caller (`data.ssi_harmful` / `data.ssi_benign`);
- KTO data: paired `{prompt, chosen, rejected}` or unpaired `{prompt, completion, label}` (TRL's
  two preference formats), each as strings or in TRL's conversational format (`prompt` a list of
  `{role, content}` messages ending with a user turn, completions one assistant message);
  optional `source`, `language`, `harmful`, `idx`;
- evaluation prompts: any parallel shape, or one row per (prompt, language) `{id, prompt,
  lingual|language, ...}` (the authors' multijail_1k.json).

Every problem is a `DataError` whose message is one line `"<file>:<where>: <field>: <problem>"`;
`<where>` is a line number (CSV, JSONL, malformed JSON), `record N` (0-based position in a JSON
list), `row N` (a dataset) or `-` for the file as a whole.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

from lasa_jax.data.languages import MULTIJAIL_LANGUAGES, normalize_language
from lasa_jax.data.sources import FIXTURES_DIR, as_sources, csv_rows, records
from lasa_jax.errors import DataError, UnknownLanguage

# `source` values that mean "harmful" when a record carries no explicit label: "safety" is the
# authors' default for their translated safety data, "harmbench" and "multijail" the benchmarks
# it is built from, "harmful"/"unsafe" the plain words. Benign counterparts: the authors'
# UltraFeedback data and the "general" source of their KTO mix.
DEFAULT_HARMFUL_SOURCES = frozenset({"harmful", "unsafe", "safety", "harmbench", "multijail"})
DEFAULT_BENIGN_SOURCES = frozenset({"benign", "harmless", "safe", "general", "ultrafeedback"})
# Fields that hold a prompt's harmful label (true = harmful), in the order they are read.
LABEL_FIELDS = ("harmful", "is_unsafe", "label")

_META_COLUMNS = ("id", "idx", "source", "tags", "tag", "harmful")
_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}
_ROLES = ("system", "user", "assistant")

PathLike = "str | os.PathLike | Source | Sequence[Source]"


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


Messages = tuple[tuple[str, str], ...]  # ((role, content), ...)


@dataclasses.dataclass(frozen=True)
class KTOPair:
    """A preference pair. `prompt` is the text of the last user turn (what the SSI reads);
    `messages` the whole prompt conversation when the file gave one (None = one user turn)."""

    prompt: str
    chosen: str
    rejected: str
    source: str | None
    idx: str
    language: str | None = None
    harmful: bool | None = None
    messages: Messages | None = None

    @property
    def prompt_messages(self) -> Messages:
        return self.messages or (("user", self.prompt),)


@dataclasses.dataclass(frozen=True)
class KTOExample:
    """One unpaired KTO example (TRL's unpaired preference format): `desirable` is its `label`."""

    prompt: str
    completion: str
    desirable: bool
    source: str | None
    idx: str
    language: str | None = None
    harmful: bool | None = None
    messages: Messages | None = None

    @property
    def prompt_messages(self) -> Messages:
        return self.messages or (("user", self.prompt),)


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt: `qid` groups the languages of one query where the file is parallel."""

    qid: str
    language: str
    text: str


# ---------------------------------------------------------------------------------------------
# Record access


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Record:
    """Typed field access on one record, raising located DataErrors."""

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

    def string(self, field: str) -> str | None:
        """An optional metadata string (`source`)."""
        value = self.data.get(field)
        if value is not None and not isinstance(value, str):
            raise self.error(field, f"expected a string, got {type(value).__name__} {_short(value)}")
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

    def messages(self, field: str, *, completion: bool) -> tuple[Messages | None, str]:
        """A string, or TRL's conversational list of {role, content} messages. For a prompt:
        (messages, text of the last user turn), the list ending with a user turn; for a
        completion: (None, content of its single assistant message)."""
        value = self.data.get(field)
        if not isinstance(value, list):
            return None, self.text(field)
        if not value:
            raise self.error(field, "empty message list")
        out = []
        for i, msg in enumerate(value):
            where = f"{field}[{i}]"
            if not isinstance(msg, dict):
                raise self.error(where, f"expected a {{role, content}} message, got {type(msg).__name__}")
            role = msg.get("role")
            if role not in _ROLES:
                raise self.error(f"{where}.role", f"expected one of {list(_ROLES)}, got {_short(role)}")
            out.append((role, self.text(f"{where}.content", msg.get("content"))))
        if completion:
            if len(out) != 1 or out[0][0] != "assistant":
                roles = [r for r, _ in out]
                raise self.error(field, f"expected one assistant message, got roles {roles}")
            return None, out[0][1]
        if out[-1][0] != "user":
            raise self.error(field, f"the prompt must end with a user message, not {out[-1][0]!r}")
        return tuple(out), out[-1][1]


def _check_unique(seen: dict, key: Any, path: str, where: str, field: str, shown: str) -> None:
    if key in seen:
        first_path, first_where = seen[key]
        at = _where_phrase(first_where) + ("" if first_path == path else f" of {first_path}")
        raise DataError(path, where, field, f"duplicate {shown} (first at {at})")
    seen[key] = (path, where)


def _where_phrase(where: str) -> str:
    return where if where.startswith(("record", "row")) else f"line {where}"


def _language_order(code: str) -> tuple[int, str]:
    return (MULTIJAIL_LANGUAGES.index(code), "") if code in MULTIJAIL_LANGUAGES else (len(MULTIJAIL_LANGUAGES), code)


def _wanted(languages, extra, label: str) -> list[str] | None:
    if languages is None:
        return None
    try:
        return [normalize_language(lang, extra) for lang in languages]
    except UnknownLanguage as e:
        raise DataError(label, None, "languages", str(e)) from None


# ---------------------------------------------------------------------------------------------
# Parallel queries


def read_parallel(path: PathLike, languages: Sequence[str] | None = None, *,
                  extra_languages: Iterable[str] = (), model_path: str = "") -> list[ParallelQuery]:
    """Read parallel queries from any source (a MultiJail CSV, the authors' JSON, JSONL, wide
    dataset rows; several sources are concatenated and their ids must stay unique).

    `languages`: when given, every record must have a non-empty text in each of them (else a
    DataError naming the record and language) and the result keeps only those; when None, every
    language found is kept. `extra_languages` admits codes outside the ISO table.
    """
    extra = tuple(extra_languages)
    sources = as_sources(path, model_path=model_path)
    wanted = _wanted(languages, extra, sources[0].spec)
    queries: list[ParallelQuery] = []
    seen: dict = {}
    for src in sources:
        if src.kind == "csv" and not src.columns:
            rows = _read_parallel_csv(src.path, wanted, extra)
        else:
            rows = [(where, _parallel_record(_Record(src.spec, where, raw), wanted, extra))
                    for where, raw in records(src)]
        for where, q in rows:
            _check_unique(seen, q.qid, src.spec, where, "id", f"id {q.qid!r}")
            queries.append(q)
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
    elif "texts" in rec.data:
        qid = rec.ident("id")
        table, table_name = rec.data.get("texts"), "texts"
    else:
        return _wide_record(rec, wanted, extra)
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
    texts = _select(texts, wanted, rec, table_name)
    return ParallelQuery(qid=qid, texts=texts, harmful=rec.label("harmful"), source=rec.string("source") or "")


def _language_columns(names: Iterable[str], extra: tuple[str, ...], fail) -> dict[str, str]:
    """language code -> column name, for the columns whose name is a language label."""
    out: dict[str, str] = {}
    for name in names:
        if name.strip().lower() in _META_COLUMNS:
            continue
        try:
            lang = normalize_language(name, extra)
        except UnknownLanguage:
            continue  # MultiJail-style files carry extra columns (e.g. notes); not ours to judge.
        if lang in out:
            raise fail(f"language {lang!r} has two columns ({out[lang]!r}, {name!r})")
        out[lang] = name
    return out


def _wide_record(rec: _Record, wanted, extra) -> ParallelQuery:
    """A MultiJail-style row from a dataset: one column per language."""
    columns = _language_columns(rec.data, extra, lambda msg: rec.error("(columns)", msg))
    if not columns:
        raise rec.error("(columns)", f"no language columns and no 'translations' or 'texts' field "
                                     f"(fields: {sorted(rec.data)})")
    qid = rec.ident("id" if "id" in rec.data else "idx")
    if wanted is not None:
        missing = [lang for lang in wanted if lang not in columns]
        if missing:
            raise rec.error("(columns)", f"missing language column {missing[0]!r}")
        columns = {lang: columns[lang] for lang in wanted}
    texts = {lang: rec.text(columns[lang]) for lang in sorted(columns, key=_language_order)}
    return ParallelQuery(qid=qid, texts=texts, harmful=rec.label("harmful"), source=str(rec.data.get("source") or ""))


def _read_parallel_csv(path: str, wanted, extra) -> list[tuple[str, ParallelQuery]]:
    """The MultiJail CSV, checked at the header first (line 1) so a missing language column is
    reported once, not on every row."""
    header, rows = csv_rows(path)
    columns: dict[str, int] = {}
    for i, name in enumerate(header):
        key = name.lower()
        if key in ("id", "source", "tags", "harmful"):
            if key in columns:
                raise DataError(path, 1, "header", f"column {name!r} appears twice")
            columns[key] = i
    fail = lambda msg: DataError(path, 1, "header", msg)
    by_name = _language_columns([h for h in header if h.lower() not in columns], extra, fail)
    lang_columns = {lang: header.index(name) for lang, name in by_name.items()}
    if "id" not in columns:
        raise DataError(path, 1, "header", "missing required column 'id'")
    if wanted is not None:
        for lang in wanted:
            if lang not in lang_columns:
                raise DataError(path, 1, "header", f"missing language column {lang!r}")
        lang_columns = {lang: lang_columns[lang] for lang in wanted}
    if not lang_columns:
        raise DataError(path, 1, "header", "no language columns (expected e.g. en, zh, ...)")
    out = []
    for line, row in rows:
        record = {name: row[i] for name, i in columns.items()}
        rec = _Record(path, line, record)
        qid = rec.ident("id")
        texts = {lang: rec.text(header[i], row[i]) for lang, i in lang_columns.items()}
        harmful = rec.label("harmful") if record.get("harmful", "").strip() else None
        texts = {lang: texts[lang] for lang in sorted(texts, key=_language_order)}
        out.append((line, ParallelQuery(qid=qid, texts=texts, harmful=harmful, source=record.get("source", "").strip())))
    return out


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
# SSI prompts


def _harmful_label(rec: _Record, source: str | None, harmful_sources, benign_sources, default: bool | None) -> bool:
    given = [(f, rec.label(f)) for f in LABEL_FIELDS if rec.label(f) is not None]
    for f, value in given[1:]:
        if value != given[0][1]:
            raise rec.error(f, f"{f}={rec.data[f]!r} contradicts {given[0][0]}={rec.data[given[0][0]]!r}")
    label = given[0][1] if given else None
    if label is not None and default is not None and label != default:
        kind = "harmful" if default else "benign"
        raise rec.error(given[0][0], f"labelled {'harmful' if label else 'benign'} in a file given as {kind}")
    if label is not None:
        return label
    if default is not None:
        return default
    if source is not None:
        if source in harmful_sources:
            return True
        if source in benign_sources:
            return False
    # Guessing "benign" for an unrecognised source would quietly poison the probe's labels.
    raise rec.error(
        "harmful",
        f"no {', '.join(repr(f) for f in LABEL_FIELDS)} field and source {source!r} is in neither the harmful "
        f"{sorted(harmful_sources)} nor the benign {sorted(benign_sources)} sources (or give the file as "
        f"data.ssi_harmful / data.ssi_benign)",
    )


def read_prompts(
    path: PathLike,
    harmful_sources: Iterable[str] = DEFAULT_HARMFUL_SOURCES,
    *,
    benign_sources: Iterable[str] = DEFAULT_BENIGN_SOURCES,
    language: str | None = None,
    harmful: bool | None = None,
    languages: Sequence[str] | None = None,
    extra_languages: Iterable[str] = (),
    model_path: str = "",
) -> list[Prompt]:
    """Read SSI prompts `{prompt, language, source, idx}` from any source.

    Label: an explicit `harmful`, `is_unsafe` (bool) or `label` (0/1) field; else the `harmful`
    argument (the whole file is harmful or benign; a record labelled otherwise is an error);
    else `source` in `harmful_sources` or `benign_sources`; else a DataError. Language: the
    record's `language` (or the authors' `lingual`); else the `{lang}` its path was expanded
    for (`languages` lists them); else `language`. A missing `idx` defaults to the record number.
    """
    harmful_sources, benign_sources = frozenset(harmful_sources), frozenset(benign_sources)
    extra = tuple(extra_languages)
    prompts: list[Prompt] = []
    seen: dict = {}
    for src in as_sources(path, languages=languages, model_path=model_path):
        default_lang = src.language or language
        for n, (where, raw) in enumerate(records(src)):
            rec = _Record(src.spec, where, raw)
            text = rec.text("prompt")
            lang = _record_language(rec, default_lang, extra, required=True, pinned=src.language)
            source = rec.string("source")
            label = _harmful_label(rec, source, harmful_sources, benign_sources, harmful)
            idx = rec.ident("idx", default=str(n))
            _check_unique(seen, (source, idx, lang), src.spec, where, "idx",
                          f"(source, idx, language) = ({source!r}, {idx!r}, {lang!r})")
            prompts.append(Prompt(text=text, language=lang, harmful=label, source=source or "", idx=idx))
    return prompts


def _record_language(rec: _Record, default: str | None, extra: tuple[str, ...], required: bool,
                     pinned: str | None = None) -> str | None:
    value, field = rec.data.get("language"), "language"
    alias = rec.data.get("lingual")
    if value is None and alias is not None:
        value, field = alias, "lingual"
    if value is None:
        value, field = default, "language"
        if value is None:
            if required:
                raise rec.error("language", "missing required field (or pass language=..., or put {lang} in the path)")
            return None
    lang = rec.language(field, value, extra)
    if field == "language" and alias is not None and rec.language("lingual", alias, extra) != lang:
        raise rec.error("lingual", f"{alias!r} contradicts language {value!r}")
    if pinned is not None and lang != pinned:
        raise rec.error(field, f"{value!r} contradicts the file's {{lang}} = {pinned!r}")
    return lang


# ---------------------------------------------------------------------------------------------
# KTO data


def read_kto_pairs(path: PathLike, *, extra_languages: Iterable[str] = (),
                   model_path: str = "") -> list[KTOPair | KTOExample]:
    """Read KTO data: paired `{prompt, chosen, rejected}` records (KTOPair) and unpaired
    `{prompt, completion, label}` records (KTOExample, label = desirable), as strings or in
    TRL's conversational format; optional `source`, `language` (or `lingual`), `harmful`, `idx`
    (default: the record number). Other fields (the authors' `category`) are ignored."""
    extra = tuple(extra_languages)
    out: list[KTOPair | KTOExample] = []
    seen: dict = {}
    for src in as_sources(path, model_path=model_path):
        for n, (where, raw) in enumerate(records(src)):
            rec = _Record(src.spec, where, raw)
            messages, prompt = rec.messages("prompt", completion=False)
            source = rec.string("source")
            lang = _record_language(rec, src.language, extra, required=False, pinned=src.language)
            idx = rec.ident("idx", default=str(n))
            common = dict(source=source, idx=idx, language=lang, harmful=rec.label("harmful"), messages=messages)
            if "completion" in rec.data and not ("chosen" in rec.data or "rejected" in rec.data):
                desirable = rec.label("label")
                if desirable is None:
                    raise rec.error("label", "missing required field (unpaired KTO data: true = desirable)")
                _, completion = rec.messages("completion", completion=True)
                _check_unique(seen, (source, idx, lang, desirable), src.spec, where, "idx",
                              f"(source, idx, language, label) = ({source!r}, {idx!r}, {lang!r}, {desirable})")
                out.append(KTOExample(prompt=prompt, completion=completion, desirable=desirable, **common))
                continue
            _, chosen = rec.messages("chosen", completion=True)
            _, rejected = rec.messages("rejected", completion=True)
            _check_unique(seen, (source, idx, lang), src.spec, where, "idx",
                          f"(source, idx, language) = ({source!r}, {idx!r}, {lang!r})")
            out.append(KTOPair(prompt=prompt, chosen=chosen, rejected=rejected, **common))
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation prompts


def read_eval_prompts(path: PathLike, languages: Sequence[str] | None = None, *,
                      extra_languages: Iterable[str] = (), model_path: str = "") -> list[EvalPrompt]:
    """Evaluation prompts from one-row-per-(prompt, language) records (`{id, prompt, lingual}`,
    the authors' multijail_1k.json; rows of other languages are skipped, and each of
    `languages` must have at least one) or from any parallel shape (every query in each of
    `languages`)."""
    extra = tuple(extra_languages)
    sources = as_sources(path, languages=languages, model_path=model_path)
    wanted = _wanted(languages, extra, sources[0].spec)
    out: list[EvalPrompt] = []
    seen: dict = {}
    for src in sources:
        rows = list(records(src)) if src.kind != "csv" or src.columns else None
        if rows is None or not _is_long(rows[0][1]):
            for q in read_parallel(src, wanted, extra_languages=extra):
                out.extend(EvalPrompt(q.qid, lang, text) for lang, text in q.texts.items())
            continue
        for n, (where, raw) in enumerate(rows):
            rec = _Record(src.spec, where, raw)
            lang = _record_language(rec, src.language, extra, required=True, pinned=src.language)
            text = rec.text("prompt")
            qid = rec.ident("id" if rec.has("id") else "idx", default=str(n))
            _check_unique(seen, (qid, lang), src.spec, where, "id", f"(id, language) = ({qid!r}, {lang!r})")
            if wanted is None or lang in wanted:
                out.append(EvalPrompt(qid, lang, text))
    if wanted is not None:
        found = {p.language for p in out}
        missing = [lang for lang in wanted if lang not in found]
        if missing:
            raise DataError(sources[0].spec, None, "language", f"no prompt in language(s) {missing}")
    return out


def _is_long(record: Any) -> bool:
    return isinstance(record, dict) and "prompt" in record and ("lingual" in record or "language" in record)


__all__ = [
    "DEFAULT_BENIGN_SOURCES",
    "DEFAULT_HARMFUL_SOURCES",
    "FIXTURES_DIR",
    "LABEL_FIELDS",
    "DataError",
    "EvalPrompt",
    "KTOExample",
    "KTOPair",
    "ParallelQuery",
    "Prompt",
    "parallel_to_prompts",
    "read_eval_prompts",
    "read_kto_pairs",
    "read_parallel",
    "read_prompts",
]
