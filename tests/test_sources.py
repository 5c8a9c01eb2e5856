"""The data-path layer (lasa_jax/data/sources.py): datasets formats (parquet, arrow, save_to_disk,
a dataset repository directory through the same load_dataset call as a hub id), an uncached hub id
offline, globs, comma-separated lists, {lang} with the jw/jv alias, column maps.

The reference for every format is the same records read from the project's own JSON/CSV fixtures
with the stdlib (csv, json); comparisons are exact. No network: HF_HUB_OFFLINE=1 (conftest)."""
import csv
import json
import os
import shutil

import datasets
import pytest

from lasa_jax.data.readers import FIXTURES_DIR, read_eval_prompts, read_parallel, read_prompts
from lasa_jax.data.sources import resolve
from lasa_jax.errors import DataError

TEN = ["en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv"]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    # load_dataset writes its Arrow cache here, not under the user's home.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _csv_rows(name):
    with open(os.path.join(FIXTURES_DIR, name), encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _ssi_records():
    with open(os.path.join(FIXTURES_DIR, "ssi_prompts.json"), encoding="utf-8") as f:
        return json.load(f)


def test_multijail_rows_from_every_dataset_format(tmp_path):
    """The MultiJail CSV as a dataset repository (hf:DIR), parquet, arrow and save_to_disk: the
    same queries as the CSV itself, which is checked against csv.DictReader."""
    rows = _csv_rows("mild_harmful.csv")
    reference = [(r["id"], {lang: r[lang] for lang in TEN}) for r in rows]
    csv_path = os.path.join(FIXTURES_DIR, "mild_harmful.csv")
    assert [(q.qid, q.texts) for q in read_parallel(csv_path, TEN)] == reference

    repo = tmp_path / "MultiJail"  # laid out like the hub repository: one CSV at the root
    repo.mkdir()
    shutil.copy(csv_path, repo / "MultiJail.csv")
    # A hub dataset's columns carry types: MultiJail's id is an int there.
    ds = datasets.Dataset.from_list([{**r, "id": int(r["id"])} for r in rows])
    ds.to_parquet(str(tmp_path / "mj.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = [os.path.join(tmp_path / "saved", f) for f in os.listdir(tmp_path / "saved") if f.endswith(".arrow")]
    assert len(arrow) == 1
    for spec in (f"hf:{repo}", f"hf:{repo}@train", str(tmp_path / "mj.parquet"), arrow[0], str(tmp_path / "saved")):
        got = read_parallel(spec, TEN)
        assert [(q.qid, q.texts) for q in got] == reference, spec
        assert [(p.qid, p.language, p.text) for p in read_eval_prompts(spec, ["th", "jv"])] == [
            (i, lang, texts[lang]) for i, texts in reference for lang in ("th", "jv")], spec


def test_prompts_from_parquet_with_a_column_map(tmp_path):
    records = _ssi_records()
    renamed = [{"text": r["prompt"], "lang": r["language"], "source": r["source"], "idx": r["idx"]} for r in records]
    datasets.Dataset.from_list(renamed).to_parquet(str(tmp_path / "p.parquet"))
    got = read_prompts(f"{tmp_path / 'p.parquet'}#prompt=text&language=lang")
    assert got == read_prompts(os.path.join(FIXTURES_DIR, "ssi_prompts.json"))
    assert [(p.text, p.source, p.idx) for p in got] == [(r["prompt"], r["source"], str(r["idx"])) for r in records]
    with pytest.raises(DataError, match=r"p.parquet#prompt=question: -|no column 'question'"):
        read_prompts(f"{tmp_path / 'p.parquet'}#prompt=question")


def test_uncached_hub_id_offline_is_one_line(tmp_path):
    assert datasets.config.HF_HUB_OFFLINE  # conftest: never the network
    with pytest.raises(DataError) as info:
        read_eval_prompts("hf:no-such-owner/no-such-dataset@test", ["en"])
    msg = str(info.value)
    assert msg.startswith("hf:no-such-owner/no-such-dataset@test:-: dataset: cannot load (") and "\n" not in msg


def test_dataset_with_several_splits_needs_one(tmp_path):
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    rows = _csv_rows("mild_harmful.csv")
    for split, part in (("train", rows[:5]), ("test", rows[5:])):
        with open(repo / "data" / f"{split}.csv", "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(part)
    with pytest.raises(DataError, match=r"several splits \['train', 'test'\]; name one with @SPLIT"):
        read_parallel(f"hf:{repo}")
    assert [q.qid for q in read_parallel(f"hf:{repo}@test")] == [r["id"] for r in rows[5:]]
    with pytest.raises(DataError, match=r"hf:.*@dev:-: dataset: cannot load|no split 'dev'"):
        read_parallel(f"hf:{repo}@dev")


def test_globs_lists_and_lang_paths(tmp_path):
    records = _ssi_records()
    by_lang = {}
    for r in records:
        by_lang.setdefault(r["language"], []).append({k: v for k, v in r.items() if k != "language"})
    for code, recs in by_lang.items():  # the authors' naming: Javanese is _jw
        (tmp_path / f"ssi_{code}.json").write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    got = read_prompts(str(tmp_path / "ssi_{lang}.json"), languages=["en", "jv", "th"])
    assert [(p.text, p.language) for p in got] == [
        (r["prompt"], lang) for lang, code in (("en", "en"), ("jv", "jw"), ("th", "th")) for r in by_lang[code]]
    half = len(records) // 2
    (tmp_path / "a.json").write_text(json.dumps(records[:half]), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records[half:]), encoding="utf-8")
    both = read_prompts(f"{tmp_path / 'a.json'}, {tmp_path / 'b.jsonl'}")
    assert both == read_prompts(os.path.join(FIXTURES_DIR, "ssi_prompts.json"))
    assert [s.path for s in resolve(str(tmp_path / "ssi_[et]*.json"))] == [
        str(tmp_path / "ssi_en.json"), str(tmp_path / "ssi_th.json")]
    with pytest.raises(DataError, match=r"ssi_x\*.json:-: file: no file matches this pattern"):
        resolve(str(tmp_path / "ssi_x*.json"))
    with pytest.raises(DataError, match=r"ssi_ja.json:-: file: not found \(language 'ja'\)"):
        read_prompts(str(tmp_path / "ssi_{lang}.json"), languages=["ja"])
    (tmp_path / "ssi_jv.json").write_text("[]")
    with pytest.raises(DataError, match=r"language 'jv' matches two files"):
        resolve(str(tmp_path / "ssi_{lang}.json"), languages=["jv"])


def test_a_record_contradicting_its_lang_path_is_an_error(tmp_path):
    (tmp_path / "p_en.json").write_text(json.dumps([{"prompt": "hi", "language": "th"}]))
    with pytest.raises(DataError, match=r"p_en.json:record 0: language: 'th' contradicts the file's \{lang\} = 'en'"):
        read_prompts(str(tmp_path / "p_{lang}.json"), harmful=False, languages=["en"])


def test_ids_unique_across_files(tmp_path):
    rows = [{"idx": 0, "original_query": "q", "translations": {"Thai": "t"}}]
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"b.json:record 0: id: duplicate id '0' \(first at record 0 of .*a.json\)"):
        read_parallel(f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}")


@pytest.mark.parametrize("spec,problem", [
    ("hf:", "expected hf:NAME"),
    ("hf:x@", "expected hf:NAME"),
    ("x.json#prompt", "column mapping 'prompt' is not FIELD=COLUMN"),
    (" , ", "no data path given"),
])
def test_bad_specs(spec, problem):
    with pytest.raises(DataError, match=problem):
        resolve(spec)


def test_plain_directory_is_not_a_dataset(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match=r"a directory that datasets did not save .* write hf:"):
        read_prompts(str(tmp_path / "d"))
