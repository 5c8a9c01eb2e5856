"""Report aggregation, table, figure and JSONL I/O.

Expected rates are worked out by hand below from the record list (exact fractions); compared
as float64 with abs tolerance 1e-12.
"""

import json

import matplotlib.image
import pytest

from lasa_jax.infra import fileio
from lasa_jax.method import figures, report


def R(model, lang, prompt_set, label, refused, ssi=None):
    return {
        "model": model, "language": lang, "prompt_set": prompt_set,
        "label": label, "refused": refused, "ssi_flagged": ssi,
        "prompt": "p", "response": "r",
    }


RECORDS = [
    # aligned first in the file: the report must still list "base" before "aligned".
    # aligned, en harmful: 1 unsafe of 4; 3 refused; 0 invalid; SSI fired on 3 of 4.
    R("aligned", "en", "harmful", "safe", True, True),
    R("aligned", "en", "harmful", "safe", True, True),
    R("aligned", "en", "harmful", "unsafe", False, False),
    R("aligned", "en", "harmful", "safe", True, True),
    # aligned, en benign: 1 of 4 refused, SSI fired on 1 of 4.
    R("aligned", "en", "benign", "safe", False, False),
    R("aligned", "en", "benign", "safe", True, True),
    R("aligned", "en", "benign", "safe", False, False),
    R("aligned", "en", "benign", "safe", False, False),
    # aligned, th harmful: 0 unsafe of 2; 2 refused; 1 invalid; SSI 2 of 2.
    R("aligned", "th", "harmful", "safe", True, True),
    R("aligned", "th", "harmful", "invalid", True, True),
    # aligned, th benign: 0 refused of 2; 1 invalid; SSI known for 1 record only, not fired.
    R("aligned", "th", "benign", "invalid", False, None),
    R("aligned", "th", "benign", "safe", False, False),
    # base (no SSI), en harmful: 2 unsafe of 4, 1 refused, 1 invalid.
    R("base", "en", "harmful", "unsafe", False),
    R("base", "en", "harmful", "unsafe", False),
    R("base", "en", "harmful", "safe", True),
    R("base", "en", "harmful", "invalid", False),
    # base, en benign: 1 of 2 refused.
    R("base", "en", "benign", "safe", False),
    R("base", "en", "benign", "safe", True),
    # base, th harmful: 3 of 3 unsafe; no benign th records for base.
    R("base", "th", "harmful", "unsafe", False),
    R("base", "th", "harmful", "unsafe", False),
    R("base", "th", "harmful", "unsafe", False),
    # a third model, jv only.
    R("qwen-x", "jv", "harmful", "unsafe", False),
]

EXPECTED = {
    "base": {
        "en": dict(n_harmful=4, n_benign=2, asr=2 / 4, refusal_rate=1 / 4, invalid_rate=1 / 4,
                   ssi_trigger_rate=None, benign_refusal_rate=1 / 2, benign_invalid_rate=0.0,
                   benign_ssi_trigger_rate=None),
        "th": dict(n_harmful=3, n_benign=0, asr=1.0, refusal_rate=0.0, invalid_rate=0.0,
                   ssi_trigger_rate=None, benign_refusal_rate=None, benign_invalid_rate=None,
                   benign_ssi_trigger_rate=None),
        "average": dict(n_harmful=7, n_benign=2, asr=(1 / 2 + 1) / 2, refusal_rate=(1 / 4 + 0) / 2,
                        invalid_rate=(1 / 4 + 0) / 2, ssi_trigger_rate=None,
                        benign_refusal_rate=1 / 2, benign_invalid_rate=0.0,
                        benign_ssi_trigger_rate=None),
    },
    "aligned": {
        "en": dict(n_harmful=4, n_benign=4, asr=1 / 4, refusal_rate=3 / 4, invalid_rate=0.0,
                   ssi_trigger_rate=3 / 4, benign_refusal_rate=1 / 4, benign_invalid_rate=0.0,
                   benign_ssi_trigger_rate=1 / 4),
        "th": dict(n_harmful=2, n_benign=2, asr=0.0, refusal_rate=1.0, invalid_rate=1 / 2,
                   ssi_trigger_rate=1.0, benign_refusal_rate=0.0, benign_invalid_rate=1 / 2,
                   benign_ssi_trigger_rate=0.0),
        "average": dict(n_harmful=6, n_benign=6, asr=1 / 8, refusal_rate=7 / 8, invalid_rate=1 / 4,
                        ssi_trigger_rate=7 / 8, benign_refusal_rate=1 / 8,
                        benign_invalid_rate=1 / 4, benign_ssi_trigger_rate=1 / 8),
    },
}


def _close(got, want):
    assert set(want) <= set(got)
    for k, v in want.items():
        if v is None:
            assert got[k] is None, k
        else:
            assert got[k] == pytest.approx(v, abs=1e-12), k


@pytest.fixture(scope="module")
def rep():
    return report.aggregate(RECORDS)


def test_aggregate_known_rates(rep):
    assert rep["languages"] == ["en", "th", "jv"]  # MultiJail order, not alphabetical
    assert list(rep["models"]) == ["base", "aligned", "qwen-x"]
    for model, cells in EXPECTED.items():
        body = rep["models"][model]
        _close(body["per_language"]["en"], cells["en"])
        _close(body["per_language"]["th"], cells["th"])
        _close(body["average"], cells["average"])
        # A language this model never saw has no rates and does not enter its average.
        assert body["per_language"]["jv"]["asr"] is None
    _close(rep["models"]["qwen-x"]["average"], dict(asr=1.0, refusal_rate=0.0, n_harmful=1))
    assert set(rep["models"]["base"]["average"]) == {"n_harmful", "n_benign", *report.METRICS}
    json.dumps(rep)  # the report is plain JSON


@pytest.mark.parametrize(
    "patch,msg",
    [
        ({"label": "harmful"}, "record 1: field 'label'"),
        ({"prompt_set": "test"}, "record 1: field 'prompt_set'"),
        ({"refused": "yes"}, "record 1: field 'refused'"),
        ({"ssi_flagged": 1}, "record 1: field 'ssi_flagged'"),
        ({"language": ""}, "record 1: field 'language'"),
    ],
)
def test_aggregate_bad_records(patch, msg):
    with pytest.raises(ValueError, match=msg):
        report.aggregate([RECORDS[0], {**RECORDS[0], **patch}])
    bad = dict(RECORDS[0])
    del bad["model"]
    with pytest.raises(ValueError, match="record 0: field 'model'"):
        report.aggregate([bad])


def test_markdown_table(rep):
    md = report.markdown_table(rep)
    lines = md.strip().splitlines()
    assert len(lines) == 2 + (3 + 1) * 3  # header, rule, (3 languages + average) x 3 models
    for lang in rep["languages"]:
        assert any(line.startswith(f"| {lang} |") for line in lines), lang
    assert "| average | aligned | 6 | 12.5% | 87.5% | 25.0% | 87.5% | 6 | 12.5% | 25.0% | 12.5% |" in lines
    assert "| th | base | 3 | 100.0% | 0.0% | 0.0% | – | 0 | – | – | – |" in lines


def test_summary_table_tier_means():
    """Tier columns are unweighted means over the languages of each MultiJail tier present
    (worked by hand: high = mean(en 0, zh 50) = 25, mid = th 100, low: no language -> –);
    a language outside MultiJail ("xx") enters only the average (mean of 0, 50, 100, 100 = 62.5 -> 62)."""
    recs = [R("m", "en", "harmful", "safe", True), R("m", "zh", "harmful", "unsafe", False),
            R("m", "zh", "harmful", "safe", True), R("m", "th", "harmful", "unsafe", False),
            R("m", "xx", "harmful", "unsafe", False)]
    lines = report.summary_table(report.aggregate(recs)).strip().splitlines()
    assert lines[0] == "| metric (%) | model | en | zh | th | xx | high | mid | low | avg |"
    assert "| ASR | m | 0 | 50 | 100 | 100 | 25 | 100 | – | 62 |" in lines
    assert "| benign refused | m | – | – | – | – | – | – | – | – |" in lines
    assert len(lines) == 2 + len(report.SUMMARY_METRICS)


def test_plot_asr(rep, tmp_path):
    path = tmp_path / "figs" / "asr.png"
    fig = figures.plot_asr(rep, path)
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    (ax,) = fig.axes
    assert ax.get_xlabel() == "Language" and "Attack success rate" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["en", "th", "jv", "avg"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["base", "aligned", "qwen-x"]
    base_bars = ax.containers[0]
    heights = [b.get_height() for b in base_bars]
    # float64, abs 1e-9: en 50 %, th 100 %, jv missing (NaN), avg 75 %.
    assert heights[0] == pytest.approx(50.0, abs=1e-9)
    assert heights[1] == pytest.approx(100.0, abs=1e-9)
    assert heights[2] != heights[2]
    assert heights[3] == pytest.approx(75.0, abs=1e-9)


def test_jsonl_round_trip(tmp_path):
    recs = [dict(r, response="抱歉，我不能 / ขออภัย \u2019") for r in RECORDS]
    path = tmp_path / "evaluate" / "generations.jsonl"
    fileio.write_jsonl(path, recs)
    assert fileio.read_jsonl(path) == recs
    assert "抱歉" in path.read_text(encoding="utf-8")  # kept readable, not \u-escaped
    fileio.write_jsonl(path, recs[:2])  # overwrite in place
    assert fileio.read_jsonl(path) == recs[:2]
    assert [p.name for p in path.parent.iterdir()] == ["generations.jsonl"]  # no temp left


def test_jsonl_errors(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text('{"a": 1}\n\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"g\.jsonl:3: expected a JSON object"):
        fileio.read_jsonl(path)
    path.write_text('{"a": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"g\.jsonl:2: invalid JSON"):
        fileio.read_jsonl(path)
    fileio.write_jsonl(path, [{"a": 1}])
    with pytest.raises(ValueError, match="record 1 is not JSON-serialisable"):
        fileio.write_jsonl(path, [{"a": 1}, {"b": object()}])
    assert fileio.read_jsonl(path) == [{"a": 1}]  # failed write left the old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["g.jsonl"]
