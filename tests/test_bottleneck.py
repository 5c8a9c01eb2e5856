"""Stage 1 metrics against independent references (scikit-learn, plain NumPy loops).

All features are float32; references run in float64. Tolerances are stated per test.
"""

import json

import matplotlib.image
import numpy as np
import pytest
from sklearn.metrics import silhouette_samples as sk_samples
from sklearn.metrics import silhouette_score as sk_score

from lasa_jax.method import figures
from lasa_jax.method import silhouette as bn
from lasa_jax.stages.bottleneck import write_outputs

TOL = 1e-6  # float32 maths vs sklearn's float64


def _random(n, d, seed):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def _synthetic(semantic_layers=(5,), num_queries=24, num_languages=7, num_layers=9, d=64,
               seed=0, weights=None):
    """Prompts = mix of a query vector and a language vector + noise.

    In semantic_layers the query vector dominates; elsewhere the language vector does.
    """
    rng = np.random.default_rng(seed)
    qv = rng.normal(size=(num_queries, d))
    lv = rng.normal(size=(num_languages, d))
    qid = np.repeat(np.arange(num_queries), num_languages)
    lang = np.tile(np.array([f"lang{i}" for i in range(num_languages)]), num_queries)
    lidx = np.tile(np.arange(num_languages), num_queries)
    layers = []
    for k in range(num_layers):
        w = (weights or {}).get(k, 0.9 if k in semantic_layers else 0.25)
        noise = rng.normal(size=(len(qid), d))
        layers.append(w * qv[qid] + (1 - w) * lv[lidx] + 0.2 * noise)
    return np.stack(layers).astype(np.float32), [f"q{i}" for i in qid], list(lang)


DRAWS = 100  # one bootstrap size throughout, so the jitted bootstrap compiles once


@pytest.fixture(scope="module")
def trap():
    """24 queries x 7 languages x 9 layers; layer 5 semantic, layer 0 even more so."""
    feats, qid, lang = _synthetic(semantic_layers=(5,), weights={0: 0.97})
    report = bn.analyse(feats, list(range(9)), qid, lang, bootstrap_draws=DRAWS, seed=0)
    return feats, qid, lang, report


@pytest.fixture(scope="module")
def plain():
    """24 queries x 7 languages x 9 layers; layer 5 semantic, all others language-dominated."""
    feats, qid, lang = _synthetic(semantic_layers=(5,))
    report = bn.analyse(feats, list(range(9)), qid, lang, bootstrap_draws=DRAWS, seed=0)
    return feats, qid, lang, report


# ----------------------------------------------------------------------------- silhouette


def test_silhouette_matches_sklearn_many_clusters():
    x = _random(400, 48, seed=1)
    x[7] = 0.0  # a zero row: sklearn normalises it to zero, distance 1 to everything
    labels = np.random.default_rng(2).integers(0, 60, size=400)
    ref = sk_score(x.astype(np.float64), labels, metric="cosine")
    assert abs(bn.silhouette_score(x, labels) - ref) < TOL
    ref_s = sk_samples(x.astype(np.float64), labels, metric="cosine")
    np.testing.assert_allclose(np.asarray(bn.silhouette_samples(x, labels)), ref_s,
                               rtol=0, atol=TOL)


def test_silhouette_singletons_and_arbitrary_hashable_labels():
    x = _random(30, 16, seed=3)
    ints = np.array([0] * 8 + [1] * 8 + [2] * 9 + [3, 4, 5, 6, 7])  # five singletons
    labels = [("cluster", int(i)) for i in ints]  # tuples: np.unique could not sort these
    ref_s = sk_samples(x.astype(np.float64), ints, metric="cosine")
    got = np.asarray(bn.silhouette_samples(x, labels))
    np.testing.assert_allclose(got, ref_s, rtol=0, atol=TOL)
    assert np.all(got[-5:] == 0.0)
    # The extreme allowed label count, N-1: one pair and the rest singletons.
    ints = np.r_[0, 0, np.arange(1, 29)]
    assert abs(bn.silhouette_score(x, ints) - sk_score(x.astype(np.float64), ints,
                                                       metric="cosine")) < TOL


def test_identical_features_have_silhouette_zero_like_sklearn():
    """Every prompt with the same feature (layer 0 when all prompts end in one token, 12 queries
    x 10 languages): sklearn gives exactly 0; float32 rounding of 1 - cos must not turn that into
    a +-1 of noise (it did for some rows before the degenerate-distance guard). Abs tol 0."""
    qid, lang = [i % 12 for i in range(120)], [i // 12 for i in range(120)]
    for d in (24, 64):
        for seed in range(5):
            x = np.tile(np.random.default_rng(seed).normal(size=d).astype(np.float32), (120, 1))
            assert sk_score(x.astype(np.float64), qid, metric="cosine") == 0.0
            m = bn.layer_metrics(np.stack([x, x]), qid, lang)
            assert np.all(np.asarray(m["s_sem"]) == 0.0) and np.all(np.asarray(m["s_lang"]) == 0.0), (d, seed)
            assert np.all(np.asarray(bn.silhouette_samples(x, qid)) == 0.0), (d, seed)


@pytest.mark.parametrize("labels", [[0] * 10, list(range(10))])
def test_silhouette_rejects_invalid_label_counts(labels):
    with pytest.raises(ValueError, match="labels: silhouette needs 2 <="):
        bn.silhouette_score(_random(10, 4, seed=0), labels)


# ----------------------------------------------------------------------------- per layer


def _cos_stats_loop(x, labels):
    """Mean cosine over ordered pairs i != j, same label vs different label (float64)."""
    x = x.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    same, other = [], []
    for i in range(len(x)):
        for j in range(len(x)):
            if i != j:
                (same if labels[i] == labels[j] else other).append(x[i] @ x[j])
    return np.mean(same), np.mean(other)


def test_layer_metrics_against_sklearn_and_numpy_loop():
    feats, qid, lang = _synthetic(num_queries=5, num_languages=3, num_layers=3, d=12, seed=4)
    feats[1] *= 7.5  # scale must not matter: rows are L2-normalised
    m = bn.layer_metrics(feats, qid, lang)
    assert all(v.shape == (3,) for v in m.values())
    for k in range(3):
        x64 = feats[k].astype(np.float64)
        s_sem = sk_score(x64, qid, metric="cosine")
        s_lang = sk_score(x64, lang, metric="cosine")
        assert abs(m["s_sem"][k] - s_sem) < TOL
        assert abs(m["s_lang"][k] - s_lang) < TOL
        assert abs(m["diff"][k] - (s_sem - s_lang)) < 2 * TOL
        intra_l, inter_l = _cos_stats_loop(feats[k], lang)
        intra_q, inter_q = _cos_stats_loop(feats[k], qid)
        # tolerance 1e-6 absolute on cosines in [-1, 1], float32 vs float64 loop
        np.testing.assert_allclose(
            [m["cos_intra_lang"][k], m["cos_inter_lang"][k], m["cos_gap_lang"][k],
             m["cos_intra_query"][k], m["cos_inter_query"][k], m["cos_gap_query"][k]],
            [intra_l, inter_l, intra_l - inter_l, intra_q, inter_q, intra_q - inter_q],
            rtol=0, atol=TOL)


def test_layer_metrics_bad_input_messages():
    feats, qid, lang = _synthetic(num_queries=4, num_languages=3, num_layers=2, d=8)
    with pytest.raises(ValueError, match="query_ids: length 11 != N=12"):
        bn.layer_metrics(feats, qid[:-1], lang)
    bad = feats.copy()
    bad[1, 3, 2] = np.nan
    with pytest.raises(ValueError, match="features: non-finite values in captured layer index 1"):
        bn.layer_metrics(bad, qid, lang)
    with pytest.raises(ValueError, match=r"features: expected shape \(num_layers, N, d\)"):
        bn.layer_metrics(feats[0], qid, lang)


# ----------------------------------------------------------------------------- analyse


def test_analyse_finds_the_semantic_layer_and_never_layer_0(trap):
    # Layer 0 is even more semantic than layer 5, and must still not be chosen.
    report = trap[3]
    diffs = [r["diff"] for r in report["layers"]]
    assert int(np.argmax(diffs)) == 0  # the trap is real
    assert report["bottleneck_layer"] == 5
    assert report["num_layers"] == 8
    assert report["relative_depth"] == 5 / 8
    assert report["num_queries"] == 24 and report["num_languages"] == 7
    assert report["languages"] == [f"lang{i}" for i in range(7)]
    assert all(r["layer"] != 0 for r in report["runner_ups"])
    assert all(r["margin"] > 0 for r in report["runner_ups"])
    assert report["bootstrap"]["bottleneck_fraction"] == 1.0
    row = report["layers"][5]
    for key in ("layer", "s_sem", "s_lang", "diff", "diff_ci_low", "diff_ci_high",
                "cos_intra_lang", "cos_inter_lang", "cos_gap_lang", "cos_intra_query",
                "cos_inter_query", "cos_gap_query"):
        assert key in row
    json.dumps(report, allow_nan=False)  # plain floats/ints only


def test_analyse_with_a_layer_subset_and_no_bootstrap():
    feats, qid, lang = _synthetic(semantic_layers=(2,), num_layers=4)
    report = bn.analyse(feats, [0, 8, 16, 24], qid, lang, bootstrap_draws=0, num_layers=32)
    assert report["bottleneck_layer"] == 16
    assert report["relative_depth"] == 0.5
    assert report["bootstrap"] is None and report["layers"][0]["diff_ci_low"] is None
    assert "<- k*" in bn.format_table(report).splitlines()[4]
    with pytest.raises(ValueError, match="layers: 3 indices for 4 captured layers"):
        bn.analyse(feats, [0, 1, 2], qid, lang)


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_is_deterministic_and_ci_contains_point_estimate(plain):
    feats, qid, lang, report = plain
    a = bn.bootstrap_diff(feats, qid, lang, draws=DRAWS, seed=7)
    b = bn.bootstrap_diff(feats, qid, lang, draws=DRAWS, seed=7)
    c = bn.bootstrap_diff(feats, qid, lang, draws=DRAWS, seed=8)
    assert a.shape == (DRAWS, 9)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for r in report["layers"]:
        assert r["diff_ci_low"] <= r["diff"] <= r["diff_ci_high"], r


def test_weighted_diff_with_unit_weights_is_the_point_estimate(plain):
    feats, qid, lang, report = plain
    got = bn._weighted_diff(feats, qid, lang, np.ones((DRAWS, 24)))  # DRAWS: no recompile
    want = [r["diff"] for r in report["layers"]]
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=0, atol=TOL)


def _resample(feats_k, qid, lang, weights):
    """Explicit resample: query q repeated weights[q] times; copies get distinct labels."""
    names = list(dict.fromkeys(qid))
    rows, sem, lan, orig, copy = [], [], [], [], []
    for qi, name in enumerate(names):
        for c in range(int(weights[qi])):
            for i in (i for i, q in enumerate(qid) if q == name):
                rows.append(i)
                sem.append(f"{name}#{c}")
                lan.append(lang[i])
                orig.append(qi)
                copy.append(c)
    return feats_k[rows].astype(np.float64), sem, lan, np.array(orig), np.array(copy)


def _paraphrased(lang):
    """Give some queries two prompts in one language (non-unique (query, language) cells)."""
    lang = list(lang)
    lang[1], lang[6] = lang[0], lang[4]  # query 0 and query 1 (4 languages per query)
    return lang


@pytest.mark.parametrize("paraphrases", [False, True])
def test_weighted_diff_subset_and_distinct_copies_match_sklearn(paraphrases):
    feats, qid, lang = _synthetic(num_queries=8, num_languages=4, num_layers=2, d=16, seed=5)
    if paraphrases:
        lang = _paraphrased(lang)
    subset = np.array([1, 0, 1, 1, 0, 1, 1, 0])       # 0/1 weights: a plain subset
    dup = np.array([2, 0, 1, 3, 0, 1, 0, 1])          # duplicates, 8 draws
    got = bn._weighted_diff(feats, qid, lang, np.stack([subset, dup]), duplicates="distinct")
    got_ex = bn._weighted_diff(feats, qid, lang, subset[None], duplicates="exclude")
    for k in range(2):
        for row, w in enumerate([subset, dup]):
            x, sem, lan, _, _ = _resample(feats[k], qid, lang, w)
            ref = sk_score(x, sem, metric="cosine") - sk_score(x, lan, metric="cosine")
            assert abs(got[row, k] - ref) < 2 * TOL, (row, k)
        assert abs(got_ex[0, k] - got[0, k]) < TOL  # the two modes agree without copies


def _exclude_reference(x, sem, lan, orig, copy):
    """Silhouette diff where a point ignores the other copies of its own query (NumPy loop)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = np.clip(1.0 - x @ x.T, 0.0, 2.0)

    def silhouette(labels, i, visible):
        own = [j for j in visible if labels[j] == labels[i] and j != i]
        if not own:
            return 0.0
        a = dist[i, own].mean()
        b = min(dist[i, [j for j in visible if labels[j] == lab]].mean()
                for lab in {labels[j] for j in visible} - {labels[i]})
        return (b - a) / max(a, b)

    n = len(x)
    s_sem, s_lang = [], []
    for i in range(n):
        visible = [j for j in range(n) if orig[j] != orig[i] or copy[j] == copy[i]]
        s_sem.append(silhouette(sem, i, visible))
        s_lang.append(silhouette(lan, i, visible))
    return np.mean(s_sem) - np.mean(s_lang)


@pytest.mark.parametrize("paraphrases", [False, True])
def test_weighted_diff_exclude_mode_matches_numpy_reference(paraphrases):
    feats, qid, lang = _synthetic(num_queries=8, num_languages=4, num_layers=2, d=16, seed=6)
    if paraphrases:
        lang = _paraphrased(lang)
    dup = np.array([2, 0, 1, 3, 0, 1, 0, 1])
    got = bn._weighted_diff(feats, qid, lang, dup[None], duplicates="exclude")[0]
    for k in range(2):
        ref = _exclude_reference(*_resample(feats[k], qid, lang, dup))
        assert abs(got[k] - ref) < 2 * TOL, k


# ----------------------------------------------------------------------------- outputs


def test_write_outputs_figures_and_report(tmp_path, plain):
    feats, qid, lang, report = plain
    layers = list(range(9))
    paths = write_outputs(tmp_path / "out", report, feats, layers, qid, lang,
                             extra={"config": {"model": "tiny"}, "fingerprint": "abc"})
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["bottleneck_layer"] == report["bottleneck_layer"] == 5
    assert saved["config"] == {"model": "tiny"} and saved["fingerprint"] == "abc"
    for key in ("silhouette", "projection"):
        img = matplotlib.image.imread(paths[key])
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500
        assert img[..., :3].std() > 0.05  # not a blank canvas

    fig = figures.plot_silhouette(report, tmp_path / "s.png")
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    assert len(ax.get_legend().get_texts()) == 4  # S_sem, S_lang, diff, CI band
    assert any("k* = 5" in t.get_text() for t in ax.texts)

    fig = figures.plot_projection(feats, layers, qid, lang, [1, 5, 8], tmp_path / "p.png")
    assert len(fig.axes) == 6
    assert all(a.get_xlabel().startswith("PC1") and a.get_ylabel().startswith("PC2")
               for a in fig.axes)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == sorted(set(lang))
    assert "layer 5" in fig.axes[1].get_title()

    with pytest.raises(ValueError, match="extra: keys \\['layers'\\] would overwrite"):
        write_outputs(tmp_path / "x", report, feats, layers, qid, lang, extra={"layers": 1})
    with pytest.raises(ValueError, match="show_layers: layers \\[12\\]"):
        figures.plot_projection(feats, layers, qid, lang, [12], tmp_path / "q.png")
