"""Tests for lasa_jax.data.languages, lasa_jax.data.readers and the project's fixtures.

Reference for the readers: the standard library's csv/json parsing of the same files, done here
independently. Exact comparisons throughout (strings, bools); no floating point is involved.
"""

from __future__ import annotations

import csv
import filecmp
import importlib.util
import json
import os

import pytest

from lasa_jax.data.languages import (
    LANGUAGE_NAMES,
    LANGUAGE_TIERS,
    MULTIJAIL_LANGUAGES,
    UnknownLanguage,
    language_tier,
    normalize_language,
)
from lasa_jax.data.readers import (
    DEFAULT_HARMFUL_SOURCES,
    FIXTURES_DIR,
    DataError,
    KTOPair,
    ParallelQuery,
    parallel_to_prompts,
    read_kto_pairs,
    read_parallel,
    read_prompts,
)

FIX = lambda name: os.path.join(FIXTURES_DIR, name)  # noqa: E731


def _write(tmp_path, name: str, content, mode: str = "text") -> str:
    path = tmp_path / name
    if mode == "bytes":
        path.write_bytes(content)
    elif mode == "json":
        path.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    elif mode == "jsonl":
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in content) + "\n", encoding="utf-8")
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def _error(fn, *args, **kwargs) -> str:
    """Run fn expecting a DataError; check the one-line format and return the message."""
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert msg.startswith(info.value.file + ":"), msg
    return msg


# ---------------------------------------------------------------------------------------------
# languages


def test_iso_codes_and_english_names_normalise():
    for code, name in LANGUAGE_NAMES.items():
        assert normalize_language(code) == code
        assert normalize_language(code.upper()) == code
        assert normalize_language(name) == code
        assert normalize_language(name.upper()) == code
        assert normalize_language(f"  {name.lower()} ") == code
    # The names the authors' JSON uses, spelled out independently of LANGUAGE_NAMES.
    authors = {"English": "en", "Chinese": "zh", "Italian": "it", "Vietnamese": "vi", "Arabic": "ar",
               "Korean": "ko", "Thai": "th", "Bengali": "bn", "Swahili": "sw", "Javanese": "jv"}
    assert {k: normalize_language(k) for k in authors} == authors


def test_odd_codes_normalise():
    assert normalize_language("jw") == "jv"
    assert normalize_language("JW") == "jv"
    assert normalize_language("zh-cn") == "zh"
    assert normalize_language("zh-CN") == "zh"
    assert normalize_language("zh_CN") == "zh"


def test_unknown_language_raises_value_error_naming_the_value():
    for bad in ("klingon", "xx", "", "e n", "english-us"):
        with pytest.raises(UnknownLanguage) as info:
            normalize_language(bad)
        assert repr(bad) in str(info.value)
        assert isinstance(info.value, ValueError)
    with pytest.raises(UnknownLanguage):
        normalize_language(3)  # type: ignore[arg-type]


def test_any_iso_code_and_extra_codes():
    # Languages outside MultiJail (XSafety's es, fr, hi, ja, ru, de) are ordinary ISO codes.
    assert [normalize_language(x) for x in ("es", "FR", "Hindi", "ja", "rus", "de")] == ["es", "fr", "hi", "ja", "ru", "de"]
    # Region subtags are kept, never merged: Traditional Chinese is not MultiJail's zh.
    assert normalize_language("zh-TW") == "zh-tw" and normalize_language("pt_BR") == "pt-br"
    assert normalize_language("iw") == "he"  # a withdrawn ISO code
    with pytest.raises(UnknownLanguage):
        normalize_language("qq")
    assert normalize_language("QQ", extra=("qq",)) == "qq"
    assert normalize_language("en", extra=("qq",)) == "en"


def test_iso_table_covers_every_lingua_language():
    """lingua (an independent table) knows 75 languages by ISO 639-1 code; ours must know them all."""
    from lingua import Language
    codes = {lang.iso_code_639_1.name.lower() for lang in Language.all()}
    assert len(codes) == 75
    assert {c: normalize_language(c) for c in codes} == {c: c for c in codes}


def test_tiers_partition_multijail():
    flat = [c for codes in LANGUAGE_TIERS.values() for c in codes]
    assert sorted(flat) == sorted(MULTIJAIL_LANGUAGES) and len(flat) == len(set(flat)) == 10
    assert LANGUAGE_TIERS["high"] == ("en", "zh", "it", "vi")
    assert LANGUAGE_TIERS["mid"] == ("ar", "ko", "th")
    assert LANGUAGE_TIERS["low"] == ("bn", "sw", "jv")
    assert language_tier("jw") == "low" and language_tier("Chinese") == "high"
    with pytest.raises(UnknownLanguage):
        language_tier("ja")  # a language outside MultiJail has no tier


# ---------------------------------------------------------------------------------------------
# file-level errors (all readers)


@pytest.mark.parametrize("reader", [read_parallel, read_prompts, read_kto_pairs])
def test_missing_file(tmp_path, reader):
    path = str(tmp_path / "nope.json")
    msg = _error(reader, path)
    assert msg == f"{path}:-: file: not found"


@pytest.mark.parametrize("reader", [read_parallel, read_prompts, read_kto_pairs])
def test_unsupported_extension(tmp_path, reader):
    path = _write(tmp_path, "x.txt", "hello")
    assert "unsupported extension '.txt'" in _error(reader, path)


@pytest.mark.parametrize("reader", [read_parallel, read_prompts, read_kto_pairs])
def test_malformed_json_reports_line(tmp_path, reader):
    path = _write(tmp_path, "x.json", '[\n {"prompt": "a",\n  "source": }\n]\n')
    msg = _error(reader, path)
    assert msg.startswith(f"{path}:3: json: malformed JSON"), msg


@pytest.mark.parametrize("reader", [read_parallel, read_prompts, read_kto_pairs])
def test_malformed_jsonl_reports_line(tmp_path, reader):
    path = _write(tmp_path, "x.jsonl", '{"prompt": "a"}\n\n{"prompt": \n')
    assert _error(reader, path).startswith(f"{path}:3: json: malformed JSON")


def test_jsonl_content_in_json_file_gets_a_hint(tmp_path):
    path = _write(tmp_path, "x.json", '{"prompt": "a", "language": "en", "source": "benign"}\n'
                                      '{"prompt": "b", "language": "en", "source": "benign"}\n')
    msg = _error(read_prompts, path)
    assert msg.startswith(f"{path}:2: json:") and ".jsonl" in msg


def test_json_root_must_be_list_and_records_objects(tmp_path):
    path = _write(tmp_path, "x.json", {"prompt": "a"}, "json")
    assert "(root): expected a JSON list" in _error(read_prompts, path)
    path = _write(tmp_path, "y.json", [{"prompt": "a", "language": "en", "source": "benign"}, "oops"], "json")
    assert _error(read_prompts, path) == f"{path}:record 1: (record): expected a JSON object, got str"


@pytest.mark.parametrize("name,content,problem", [
    ("x.json", "[]", ":-: file: no records"),
    ("x.json", "", ":1: json: malformed JSON: Expecting value"),
    ("x.jsonl", "", ":-: file: no records"),
    ("x.jsonl", "\n \n", ":-: file: no records"),
])
def test_empty_files_are_errors(tmp_path, name, content, problem):
    path = _write(tmp_path, name, content)
    assert _error(read_prompts, path).startswith(path + problem)


def test_invalid_utf8_reports_line(tmp_path):
    raw = b'{"prompt": "ok"}\n{"prompt": "\xff\xfe"}\n'
    path = _write(tmp_path, "x.jsonl", raw, "bytes")
    assert _error(read_prompts, path) == f"{path}:2: encoding: not valid UTF-8 (byte {raw.index(0xFF)})"


# ---------------------------------------------------------------------------------------------
# read_prompts


def _p(**kw):
    rec = {"prompt": "Write a poem.", "language": "en", "source": "benign", "idx": 0}
    rec.update(kw)
    return {k: v for k, v in rec.items() if v is not None}


def test_prompts_label_sources(tmp_path):
    records = [
        _p(idx=0, source="harmful"),
        _p(idx=1, source="benign"),
        _p(idx=2, source="whatever", harmful=True),
        _p(idx=3, source="whatever", label=0),
        _p(idx=4, source="safety", label=1, language="Javanese"),
        _p(idx=5, source="harmful", harmful=False),  # an explicit label beats the source
    ]
    for ext, mode in ((".json", "json"), (".jsonl", "jsonl")):
        path = _write(tmp_path, "p" + ext, records, mode)
        got = read_prompts(path)
        assert [p.harmful for p in got] == [True, False, True, False, True, False]
        assert [p.idx for p in got] == ["0", "1", "2", "3", "4", "5"]
        assert got[4].language == "jv"
    assert "safety" in DEFAULT_HARMFUL_SOURCES


def test_prompts_custom_harmful_sources(tmp_path):
    path = _write(tmp_path, "p.json", [_p(source="redteam")], "json")
    assert read_prompts(path, harmful_sources={"redteam"})[0].harmful is True
    msg = _error(read_prompts, path)
    assert msg.startswith(f"{path}:record 0: harmful: no 'harmful', 'is_unsafe', 'label' field and source 'redteam'")


@pytest.mark.parametrize("field,value", [("harmful", "maybe"), ("label", 2), ("label", "x"), ("harmful", 0.5)])
def test_prompts_unknown_label(tmp_path, field, value):
    path = _write(tmp_path, "p.json", [_p(), _p(idx=1, **{field: value})], "json")
    msg = _error(read_prompts, path)
    assert msg.startswith(f"{path}:record 1: {field}: unknown label"), msg


def test_prompts_contradicting_labels(tmp_path):
    path = _write(tmp_path, "p.json", [_p(harmful=True, label=0)], "json")
    assert "contradicts" in _error(read_prompts, path)


def test_prompts_missing_and_wrong_fields(tmp_path):
    path = _write(tmp_path, "p.json", [_p(), {"language": "en", "source": "benign"}], "json")
    assert _error(read_prompts, path) == f"{path}:record 1: prompt: missing required field"
    path = _write(tmp_path, "p.jsonl", [_p(), _p(idx=1, prompt=42)], "jsonl")
    assert _error(read_prompts, path) == f"{path}:2: prompt: expected a string, got int 42"
    path = _write(tmp_path, "q.json", [_p(idx=[1])], "json")
    assert _error(read_prompts, path).startswith(f"{path}:record 0: idx: expected an integer or string id")
    path = _write(tmp_path, "r.json", [_p(idx=True)], "json")
    assert "idx: expected an integer or string id, got bool" in _error(read_prompts, path)
    path = _write(tmp_path, "s.json", [{"prompt": "hi", "source": "benign"}], "json")
    assert _error(read_prompts, path).startswith(f"{path}:record 0: language: missing required field")


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_prompts_empty_text(tmp_path, text):
    path = _write(tmp_path, "p.json", [_p(prompt=text)], "json")
    assert _error(read_prompts, path) == f"{path}:record 0: prompt: empty or whitespace-only text"


def test_prompts_unknown_language(tmp_path):
    path = _write(tmp_path, "p.jsonl", [_p(language="Klingon")], "jsonl")
    msg = _error(read_prompts, path)
    assert msg.startswith(f"{path}:1: language: unknown language 'Klingon'")
    assert read_prompts(path, extra_languages=("klingon",))[0].language == "klingon"


def test_prompts_duplicate_idx(tmp_path):
    records = [_p(idx=7), _p(idx=7, language="zh"), _p(idx=7, source="harmful"), _p(idx="7", language="ZH")]
    path = _write(tmp_path, "p.jsonl", records, "jsonl")
    msg = _error(read_prompts, path)
    assert msg.startswith(f"{path}:4: idx: duplicate") and "first at line 2" in msg


def test_prompts_language_default_and_lingual_alias(tmp_path):
    # The authors' UltraFeedback files carry no language or source: both come from the caller.
    path = _write(tmp_path, "monolingual_first1000_jw.json",
                  [{"idx": 0, "prompt": "Tulisen puisi.", "chosen": "a", "rejected": "b"}], "json")
    got = read_prompts(path, language="jw", harmful=False)
    assert got[0].language == "jv" and got[0].harmful is False and got[0].source == ""
    path = _write(tmp_path, "p.json", [{"prompt": "x", "lingual": "Swahili", "source": "safety"}], "json")
    assert read_prompts(path)[0].language == "sw"
    path = _write(tmp_path, "q.json", [_p(language="en", lingual="zh")], "json")
    assert "lingual" in _error(read_prompts, path)


def test_error_messages_stay_on_one_line(tmp_path):
    path = _write(tmp_path, "p.json", [_p(language="not\na\nlanguage")], "json")
    msg = _error(read_prompts, path)
    assert "not\\na" in msg


# ---------------------------------------------------------------------------------------------
# read_kto_pairs


def _k(**kw):
    rec = {"prompt": "Write a poem.", "chosen": "Roses...", "rejected": "No.", "source": "general"}
    rec.update(kw)
    return {k: v for k, v in rec.items() if v is not None}


def test_kto_pairs_fields_and_default_idx(tmp_path):
    records = [_k(), _k(language="jw", harmful=True, source="safety"), _k(idx="abc", harmful=0)]
    path = _write(tmp_path, "k.jsonl", records, "jsonl")
    got = read_kto_pairs(path)
    assert got[0] == KTOPair("Write a poem.", "Roses...", "No.", "general", "0", None, None)
    assert got[1].idx == "1" and got[1].language == "jv" and got[1].harmful is True
    assert got[2].idx == "abc" and got[2].harmful is False


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_kto_missing_field(tmp_path, field):
    path = _write(tmp_path, "k.json", [_k(), _k(**{field: None})], "json")
    assert _error(read_kto_pairs, path) == f"{path}:record 1: {field}: missing required field"


def test_kto_wrong_type_empty_language_duplicate(tmp_path):
    path = _write(tmp_path, "k.json", [_k(chosen=["a"])], "json")
    assert _error(read_kto_pairs, path) == f"{path}:record 0: chosen[0]: expected a {{role, content}} message, got str"
    path = _write(tmp_path, "k1.json", [_k(chosen=7)], "json")
    assert _error(read_kto_pairs, path) == f"{path}:record 0: chosen: expected a string, got int 7"
    path = _write(tmp_path, "k2.json", [_k(rejected="  ")], "json")
    assert _error(read_kto_pairs, path) == f"{path}:record 0: rejected: empty or whitespace-only text"
    path = _write(tmp_path, "k3.json", [_k(language="xx")], "json")
    assert _error(read_kto_pairs, path).startswith(f"{path}:record 0: language: unknown language 'xx'")
    path = _write(tmp_path, "k4.json", [_k(idx=3), _k(idx=3)], "json")
    assert "record 1: idx: duplicate" in _error(read_kto_pairs, path)
    path = _write(tmp_path, "k5.json", [_k(harmful="sometimes")], "json")
    assert "harmful: unknown label" in _error(read_kto_pairs, path)


# ---------------------------------------------------------------------------------------------
# read_parallel

HEADER = "id,source,tags,en,zh,it,vi,ar,ko,th,bn,sw,jv"


def _row(i, *, skip=None):
    cells = [str(i), "test", "t"] + [("" if lang == skip else f"{lang} text {i}") for lang in MULTIJAIL_LANGUAGES]
    return ",".join(cells)


def test_csv_reads_like_stdlib(tmp_path):
    body = "\ufeff" + HEADER + ",notes,harmful\n" + "\n".join(
        _row(i) + f",ignored,{flag}" for i, flag in ((1, "1"), (2, "false"), (3, ""))) + "\n"
    path = _write(tmp_path, "m.csv", body)
    got = read_parallel(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        ref = list(csv.DictReader(f))
    assert [q.qid for q in got] == [r["id"] for r in ref]
    for q, r in zip(got, ref):
        assert q.texts == {lang: r[lang] for lang in MULTIJAIL_LANGUAGES}
        assert list(q.texts) == list(MULTIJAIL_LANGUAGES)
        assert q.source == "test"
    assert [q.harmful for q in got] == [True, False, None]


def test_csv_language_selection_and_missing(tmp_path):
    path = _write(tmp_path, "m.csv", "id,en,sw,JW\n1,a,b,c\n")
    assert read_parallel(path, languages=["en", "Javanese"])[0].texts == {"en": "a", "jv": "c"}
    assert _error(read_parallel, path, languages=["en", "th"]) == f"{path}:1: header: missing language column 'th'"
    path = _write(tmp_path, "n.csv", HEADER + "\n" + _row(1) + "\n" + _row(2, skip="sw") + "\n")
    assert _error(read_parallel, path) == f"{path}:3: sw: empty or whitespace-only text"
    assert read_parallel(path, languages=["en"])[1].texts == {"en": "en text 2"}


def test_csv_structural_errors(tmp_path):
    path = _write(tmp_path, "a.csv", "source,en\nx,hello\n")
    assert _error(read_parallel, path) == f"{path}:1: header: missing required column 'id'"
    path = _write(tmp_path, "b.csv", "id,source,notes\n1,x,y\n")
    assert "no language columns" in _error(read_parallel, path)
    path = _write(tmp_path, "c.csv", "id,en,english\n1,a,b\n")
    assert "language 'en' has two columns" in _error(read_parallel, path)
    path = _write(tmp_path, "d.csv", "id,en\n1,a,extra\n")
    assert _error(read_parallel, path) == f"{path}:2: (row): 3 cells but the header has 2 columns"
    path = _write(tmp_path, "e.csv", "id,en,harmful\n1,a,perhaps\n")
    assert _error(read_parallel, path).startswith(f"{path}:2: harmful: unknown label 'perhaps'")
    path = _write(tmp_path, "f.csv", "id,en\n,a\n")
    assert _error(read_parallel, path) == f"{path}:2: id: empty id"
    path = _write(tmp_path, "g.csv", "id,en\n")
    assert "no records" in _error(read_parallel, path)


def test_csv_duplicate_id_and_multiline_cells(tmp_path):
    # Row 1 spans lines 2-3 (a quoted newline), so the duplicate sits on line 5, its twin on 4.
    path = _write(tmp_path, "m.csv", 'id,en\n1,"two\nlines"\n2,b\n2,c\n')
    assert _error(read_parallel, path) == f"{path}:5: id: duplicate id '2' (first at line 4)"


def _authors(idx, **tr):
    translations = {"Chinese": f"zh {idx}", "Swahili": f"sw {idx}", "jw": f"jv {idx}"}
    translations.update(tr)
    return {"idx": idx, "original_query": f"en {idx}", "translations": {k: v for k, v in translations.items() if v is not None}}


def test_parallel_json_and_jsonl_shapes(tmp_path):
    path = _write(tmp_path, "p.json", [_authors(0), _authors(1)], "json")
    got = read_parallel(path)
    assert got[1] == ParallelQuery("1", {"en": "en 1", "zh": "zh 1", "sw": "sw 1", "jv": "jv 1"}, None, "")
    mixed = [_authors(0), {"id": "q1", "texts": {"en": "hi", "ko": "안녕"}, "harmful": False, "source": "s"}]
    path = _write(tmp_path, "p.jsonl", mixed, "jsonl")
    got = read_parallel(path)
    assert got[0].texts["jv"] == "jv 0"
    assert got[1] == ParallelQuery("q1", {"en": "hi", "ko": "안녕"}, False, "s")


def test_parallel_json_errors(tmp_path):
    path = _write(tmp_path, "a.json", [_authors(0), _authors(1, Swahili=None)], "json")
    assert read_parallel(path, languages=["en", "zh"])[1].texts == {"en": "en 1", "zh": "zh 1"}
    assert _error(read_parallel, path, languages=["en", "sw"]) == f"{path}:record 1: translations: missing language 'sw'"
    path = _write(tmp_path, "b.json", [_authors(0, Klingon="x")], "json")
    assert _error(read_parallel, path).startswith(f"{path}:record 0: translations.Klingon: unknown language 'Klingon'")
    path = _write(tmp_path, "c.json", [_authors(0, Javanese="again")], "json")
    assert _error(read_parallel, path) == f"{path}:record 0: translations.Javanese: language 'jv' given twice"
    path = _write(tmp_path, "d.json", [_authors(0, Chinese=" ")], "json")
    assert _error(read_parallel, path) == f"{path}:record 0: translations.Chinese: empty or whitespace-only text"
    path = _write(tmp_path, "e.json", [{"original_query": "x", "translations": {}}], "json")
    assert _error(read_parallel, path) == f"{path}:record 0: idx: missing required field"
    path = _write(tmp_path, "f.jsonl", [{"id": 1, "texts": ["en", "hi"]}], "jsonl")
    assert _error(read_parallel, path).startswith(f"{path}:1: texts: expected an object")
    path = _write(tmp_path, "g.jsonl", [_authors(3), _authors(3)], "jsonl")
    assert _error(read_parallel, path) == f"{path}:2: id: duplicate id '3' (first at line 1)"
    path = _write(tmp_path, "h.json", [_authors(0)], "json")
    assert _error(read_parallel, path, languages=["xx"]).startswith(f"{path}:-: languages: unknown language 'xx'")


def test_parallel_to_prompts():
    qs = [ParallelQuery("a", {"en": "x", "zh": "y"}, True, "s"), ParallelQuery("b", {"en": "z"}, None, "")]
    got = parallel_to_prompts(qs, harmful=True)
    assert [(p.text, p.language, p.harmful, p.source, p.idx) for p in got] == [
        ("x", "en", True, "s", "a"), ("y", "zh", True, "s", "a"), ("z", "en", True, "", "b")]
    assert parallel_to_prompts(qs[:1])[0].harmful is True
    assert parallel_to_prompts(qs, harmful=True, source="harmful")[2].source == "harmful"
    with pytest.raises(ValueError, match="'b': no harmful label"):
        parallel_to_prompts(qs)
    with pytest.raises(ValueError, match="'a': harmful=False given"):
        parallel_to_prompts(qs, harmful=False)


# ---------------------------------------------------------------------------------------------
# fixtures


def _stdlib_csv(name):
    with open(FIX(name), encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_fixture_csvs_are_complete_twins():
    harmful, benign = read_parallel(FIX("mild_harmful.csv")), read_parallel(FIX("benign_twins.csv"))
    assert len(harmful) >= 24
    assert [q.qid for q in harmful] == [str(i) for i in range(1, len(harmful) + 1)]
    assert [q.qid for q in benign] == [q.qid for q in harmful]
    assert all(q.harmful is True for q in harmful) and all(q.harmful is False for q in benign)
    for h, b in zip(harmful, benign):
        assert list(h.texts) == list(b.texts) == list(MULTIJAIL_LANGUAGES)
        assert all(h.texts[lang] != b.texts[lang] for lang in MULTIJAIL_LANGUAGES)
    for lang in MULTIJAIL_LANGUAGES:  # no two queries share a text in any language
        texts = [q.texts[lang] for q in harmful + benign]
        assert len(set(texts)) == len(texts), lang
    # Independent reference: the stdlib's view of the same file.
    ref = _stdlib_csv("mild_harmful.csv")
    assert [{lang: r[lang] for lang in MULTIJAIL_LANGUAGES} for r in ref] == [q.texts for q in harmful]


@pytest.mark.parametrize("csv_name,json_name", [("mild_harmful.csv", "parallel_harmful.json"),
                                                ("benign_twins.csv", "parallel_benign.json")])
def test_fixture_csv_and_authors_json_agree(csv_name, json_name):
    from_csv = read_parallel(FIX(csv_name))
    from_json = read_parallel(FIX(json_name), languages=MULTIJAIL_LANGUAGES)
    assert [(q.qid, q.texts) for q in from_csv] == [(q.qid, q.texts) for q in from_json]
    with open(FIX(json_name), encoding="utf-8") as f:
        raw = json.load(f)
    assert all(set(r["translations"]) == {"Chinese", "Italian", "Vietnamese", "Arabic", "Korean", "Thai",
                                         "Bengali", "Swahili", "Javanese"} for r in raw)


def test_fixture_ssi_prompts_match_parallel_sets():
    got = read_prompts(FIX("ssi_prompts.json"))
    expected = parallel_to_prompts(read_parallel(FIX("mild_harmful.csv")), source="harmful") + \
        parallel_to_prompts(read_parallel(FIX("benign_twins.csv")), source="benign")
    assert got == expected
    with open(FIX("ssi_prompts.json"), encoding="utf-8") as f:
        raw = json.load(f)
    assert {r["language"] for r in raw} == set(MULTIJAIL_LANGUAGES) - {"jv"} | {"jw"}  # authors' code
    assert all(set(r) == {"prompt", "language", "source", "idx"} for r in raw)


def test_fixture_kto_pairs():
    pairs = read_kto_pairs(FIX("kto_pairs.json"))
    responses = {r["language"]: r for r in _stdlib_csv("kto_responses.csv")}
    assert set(responses) == set(MULTIJAIL_LANGUAGES)
    prompts = {(p.text, p.language): p.harmful for p in read_prompts(FIX("ssi_prompts.json"))}
    assert len(pairs) == len(prompts)
    for p in pairs:
        assert prompts[(p.prompt, p.language)] is p.harmful
        r = responses[p.language]
        if p.harmful:
            assert (p.source, p.chosen, p.rejected) == ("safety", r["refusal"], r["compliance_placeholder"])
            assert "[" in p.rejected  # a placeholder, never real content
        else:
            assert (p.source, p.chosen, p.rejected) == ("general", r["helpful"], r["unhelpful"])


def test_fixture_outputs_match_a_fresh_build(tmp_path):
    spec = importlib.util.spec_from_file_location("build_fixtures", FIX("build_fixtures.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names = module.build(out_dir=str(tmp_path))
    assert len(names) == 4
    for name in names:
        assert filecmp.cmp(tmp_path / name, FIX(name), shallow=False), f"{name} is stale: rerun build_fixtures.py"


def test_fixture_texts_are_in_their_language():
    """An independent language identifier (lingua) checks every fixture text it can.

    lingua has no Javanese model, so jv is only checked to be Latin-script and not English.
    """
    import lingua
    L = lingua.Language
    expected = {"en": L.ENGLISH, "zh": L.CHINESE, "it": L.ITALIAN, "vi": L.VIETNAMESE, "ar": L.ARABIC,
                "ko": L.KOREAN, "th": L.THAI, "bn": L.BENGALI, "sw": L.SWAHILI}
    detector = lingua.LanguageDetectorBuilder.from_languages(*expected.values()).build()
    texts = [(lang, t) for name in ("mild_harmful.csv", "benign_twins.csv")
             for q in read_parallel(FIX(name)) for lang, t in q.texts.items()]
    texts += [(p.language, t) for p in read_kto_pairs(FIX("kto_pairs.json"))[::10] for t in (p.chosen, p.rejected)]
    wrong = [(lang, t) for lang, t in texts if lang in expected and detector.detect_language_of(t) != expected[lang]]
    assert not wrong, wrong
    for lang, t in texts:
        if lang == "jv":
            assert t.isascii() and detector.detect_language_of(t) != L.ENGLISH, t
