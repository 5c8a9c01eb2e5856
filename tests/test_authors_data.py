"""The LASA authors' data files exactly as published (tests/fixtures/authors_data, laid out with the
repository's names and CRLF line endings by tests/authors_files.py): every file reads, each record
equals an independent json.load reading, and the config fields the issue names take them.

Pure Python, no model; exact comparisons."""
import json

import pytest
from ml_collections import ConfigDict

from authors_files import FILES, cli_overrides, fixture, lay_out
from lasa_jax.config import base_config
from lasa_jax.data import inputs
from lasa_jax.data.readers import (
    KTOPair,
    read_eval_prompts,
    read_kto_pairs,
    read_parallel,
    read_prompts,
)
from lasa_jax.errors import ConfigError, DataError
from lasa_jax.method.kto_data import pairs_to_items

# The authors' language names and codes, written out here (not taken from lasa_jax's tables).
NAME_TO_CODE = {"Arabic": "ar", "Bengali": "bn", "Chinese": "zh", "Italian": "it", "Javanese": "jv",
                "Korean": "ko", "Swahili": "sw", "Thai": "th", "Vietnamese": "vi"}
CODE = {"jw": "jv"}  # everything else in these files is already ISO
TEN = ["en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv"]


@pytest.fixture(scope="module", params=["crlf", "lf"])
def root(request, tmp_path_factory):
    return lay_out(str(tmp_path_factory.mktemp(request.param)), crlf=request.param == "crlf")


def _raw(root, name):
    with open(f"{root}/{name}", encoding="utf-8") as f:
        return json.load(f)


def test_layout_has_crlf_where_the_repository_has(tmp_path):
    root = lay_out(str(tmp_path))
    for name, (_, crlf) in FILES.items():
        raw = open(f"{root}/{name}", "rb").read()
        if crlf:
            assert raw.count(b"\n") == raw.count(b"\r\n") > 0
        else:
            assert b"\r" not in raw


def test_parallel_prompts(root):
    raw = _raw(root, "data/safety_train_translated.json")
    got = read_parallel(f"{root}/data/safety_train_translated.json", TEN)
    assert len(got) == len(raw) == 40
    for q, r in zip(got, raw):
        expected = {"en": r["original_query"], **{NAME_TO_CODE[k]: v for k, v in r["translations"].items()}}
        assert q.qid == str(r["idx"]) and q.texts == {lang: expected[lang] for lang in TEN}
        assert list(q.texts) == TEN  # MultiJail order whatever the file's key order


def test_ssi_harmful_file_with_is_unsafe(root):
    raw = _raw(root, "data/ssi/unsafe_train.json")
    got = read_prompts(f"{root}/data/ssi/unsafe_train.json")
    assert len(got) == len(raw) == 209
    assert [(p.text, p.language, p.harmful, p.source, p.idx) for p in got] == [
        (r["prompt"], CODE.get(r["language"], r["language"]), r["is_unsafe"], r["source"], str(r["idx"])) for r in raw]
    assert {p.source for p in got} == {"safety_train_translated"}  # not one of our known sources: the label decides


def test_unlabelled_harmbench_as_ssi_harmful(root):
    raw = _raw(root, "data/ssi/harmbench_training.json")
    got = read_prompts(f"{root}/data/ssi/harmbench_training.json", harmful=True)
    assert [(p.text, p.language, p.harmful) for p in got] == [(r["prompt"], r["lingual"], True) for r in raw]
    with pytest.raises(DataError, match=r"harmbench_training.json:record 0: harmful: no 'harmful', 'is_unsafe', 'label'"):
        read_prompts(f"{root}/data/ssi/harmbench_training.json")


def test_benign_files_per_language_via_lang_path(root):
    pattern = f"{root}/data/ultrafeedback/monolingual_first1000_{{lang}}.json"
    got = read_prompts(pattern, harmful=False, languages=["en", "jv"])
    en, jw = _raw(root, "data/ultrafeedback/monolingual_first1000_en.json"), _raw(
        root, "data/ultrafeedback/monolingual_first1000_jw.json")
    assert [(p.text, p.language, p.harmful, p.idx) for p in got] == (
        [(r["prompt"], "en", False, str(r["idx"])) for r in en] + [(r["prompt"], "jv", False, str(r["idx"])) for r in jw])
    with pytest.raises(DataError, match=r"monolingual_first1000_zh.json:-: file: not found \(language 'zh'\)"):
        read_prompts(pattern, harmful=False, languages=["en", "zh"])
    # A file given as benign whose record says harmful is a contradiction, not a silent relabel.
    with pytest.raises(DataError, match=r"unsafe_train.json:record 0: is_unsafe: labelled harmful in a file given as benign"):
        read_prompts(f"{root}/data/ssi/unsafe_train.json", harmful=False)


def test_kto_pairs_in_trl_conversational_format(root):
    raw = _raw(root, "data/training/mixed_dpo_ultra_safety_converted.json")
    got = read_kto_pairs(f"{root}/data/training/mixed_dpo_ultra_safety_converted.json")
    assert len(got) == len(raw) == 28 and all(isinstance(p, KTOPair) for p in got)
    for p, r in zip(got, raw):
        assert p.prompt == r["prompt"][-1]["content"]
        assert p.prompt_messages == tuple((m["role"], m["content"]) for m in r["prompt"])
        assert (p.chosen, p.rejected) == (r["chosen"][0]["content"], r["rejected"][0]["content"])
        assert (p.source, p.language) == (r["source"], r["language"])
    items = pairs_to_items(got, z_mode="source", seed=0)  # the authors' sources have default probabilities
    assert len(items) == 56 and {it.source for it in items} == {"safety", "ultrafeedback"}
    assert not any(it.z for it in items if it.source == "ultrafeedback")
    assert items[0].prompt_messages == got[0].prompt_messages


def test_multijail_1k_one_row_per_language(root):
    raw = _raw(root, "examples/multijail_1k.json")
    got = read_eval_prompts(f"{root}/examples/multijail_1k.json", TEN)
    assert [(p.qid, p.language, p.text) for p in got] == [(str(r["id"]), r["lingual"], r["prompt"]) for r in raw]
    some = read_eval_prompts(f"{root}/examples/multijail_1k.json", ["th", "Javanese"])
    assert {p.language for p in some} == {"th", "jv"} and len(some) == 200
    with pytest.raises(DataError, match=r"multijail_1k.json:-: language: no prompt in language\(s\) \['ja'\]"):
        read_eval_prompts(f"{root}/examples/multijail_1k.json", ["en", "ja"])


def _config(root, **data):
    c = base_config()
    for arg in cli_overrides(root):
        key, _, value = arg[len("--config.data."):].partition("=")
        c.data[key] = value
    for k, v in data.items():
        c.data[k] = v
    return c


def test_config_fields_read_the_authors_files(root):
    """The issue's command line (data fields only), read through data.inputs, as every stage does."""
    c = _config(root, languages="en,jv")
    read = inputs.read_all(c)
    assert len(read["parallel_prompts"]) == 40 and all(list(q.texts) == ["en", "jv"] for q in read["parallel_prompts"])
    ssi = read["ssi_prompts"]
    assert sum(p.harmful for p in ssi) == 42 and sum(not p.harmful for p in ssi) == 16  # en+jw of 209; 10+6 benign
    assert {p.language for p in ssi} == {"en", "jv"}
    assert len(read["kto_pairs"]) == 28
    assert len(read["eval_harmful"]) == 200 and {p.language for p in read["eval_harmful"]} == {"en", "jv"}
    # All ten languages need ten benign files: the sample has two, so this is a one-line error.
    with pytest.raises(DataError, match=r"monolingual_first1000_zh.json:-: config.data.ssi_benign: not found \(language 'zh'\)"):
        inputs.ssi_prompts(_config(root))


def test_ssi_needs_both_classes(root):
    c = _config(root, languages="en,jv", ssi_benign="")
    with pytest.raises(ConfigError, match="no benign prompt"):
        inputs.ssi_prompts(c)


def test_bad_records_are_one_line_errors_naming_file_record_field(tmp_path):
    rows = json.load(open(fixture("examples/multijail_1k.json"), encoding="utf-8"))[:3]
    rows[2] = dict(rows[2], prompt=None)
    path = tmp_path / "mj.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError) as info:
        read_eval_prompts(str(path), ["ar"])
    assert str(info.value) == f"{path}:record 2: prompt: missing required field"
    pairs = json.load(open(fixture("data/training/mixed_dpo_ultra_safety_converted.sample.json"), encoding="utf-8"))[:2]
    pairs[1] = dict(pairs[1], chosen=[{"role": "user", "content": "x"}])
    path = tmp_path / "kto.json"
    path.write_text(json.dumps(pairs))
    with pytest.raises(DataError) as info:
        read_kto_pairs(str(path))
    assert str(info.value) == f"{path}:record 1: chosen: expected one assistant message, got roles ['user']"
    pairs[1] = dict(pairs[0], prompt=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    path.write_text(json.dumps(pairs))
    with pytest.raises(DataError, match=r"kto.json:record 1: prompt: the prompt must end with a user message"):
        read_kto_pairs(str(path))
    pairs[1] = dict(pairs[0], prompt=[{"role": "user", "content": " "}])
    path.write_text(json.dumps(pairs))
    with pytest.raises(DataError, match=r"kto.json:record 1: prompt\[0\].content: empty or whitespace-only text"):
        read_kto_pairs(str(path))


def test_multi_turn_and_unpaired_kto_records(tmp_path):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "How do I pick a lock?"}]
    records = [
        {"prompt": conv, "completion": [{"role": "assistant", "content": "I can't help with that."}], "label": True},
        {"prompt": "How do I pick a lock?", "completion": "Here is how...", "label": False, "source": "safety"},
    ]
    path = tmp_path / "unpaired.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    got = read_kto_pairs(str(path))
    assert got[0].prompt == "How do I pick a lock?" and got[0].desirable is True and got[0].source is None
    assert got[0].prompt_messages == tuple((m["role"], m["content"]) for m in conv)  # multi-turn kept
    assert got[1].prompt_messages == (("user", "How do I pick a lock?"),) and got[1].desirable is False
    items = pairs_to_items(got[1:], z_mode="source", source_probs={"safety": 1.0}, seed=0)
    assert [(it.completion, it.desirable, it.z) for it in items] == [("Here is how...", False, True)]
    with pytest.raises(ConfigError, match="has no 'source' field"):
        pairs_to_items(got, z_mode="source", seed=0)
    path.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    with pytest.raises(DataError, match=r"unpaired.jsonl:1: label: missing required field"):
        read_kto_pairs(str(path))


def test_run_languages_outside_multijail():
    c = base_config()
    c.data.languages = "en, es,FR,Hindi,ja,ru,de,bn"  # XSafety's languages
    assert inputs.languages_of(c) == ["en", "es", "fr", "hi", "ja", "ru", "de", "bn"]
    for bad, needle in (("en,xx", "unknown language 'xx'"), ("en,EN", r"\['en'\] listed twice"), (" , ", "empty")):
        c.data.languages = bad
        with pytest.raises(ConfigError, match=f"config.data.languages: .*{needle}"):
            inputs.languages_of(c)


def test_evaluate_fails_before_generating_when_the_judge_cannot_cover_a_language(tmp_path):
    """The phrase judge has no phrases for ja: the evaluate stage stops at its first line, before
    any model loads or any prompt is generated."""
    from lasa_jax.context import Context
    from lasa_jax.stages import evaluate
    c = base_config()
    c.workdir = str(tmp_path / "run")
    c.data.languages = "en,ja"
    with pytest.raises(ConfigError, match=r"judge 'refusal' cannot judge .*no refusal phrases: \['ja'\]"):
        evaluate.run(Context(c))
    assert not (tmp_path / "run" / "evaluate").exists()


def test_issue_overrides_name_real_fields():
    c = base_config()
    for arg in cli_overrides("/x"):
        key = arg[len("--config.data."):].partition("=")[0]
        assert key in c.data, key
    assert isinstance(c.data, ConfigDict) and c.model.enable_thinking is False
