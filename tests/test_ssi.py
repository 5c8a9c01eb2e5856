"""Tests for lasa_jax.method.probe (stage 2). All model computations float32 on CPU; tolerances per test."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             roc_auc_score)

from lasa_jax.method import figures
from lasa_jax.method import probe as ssi

LANGS = ["en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv"]
TRAIN_LANGS = ("en", "zh", "ko")


# ----------------------------------------------------------------------------- references

def np_probe_logits(params, x):
    """Independent float64 NumPy forward of the probe (deterministic mode)."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params["params"])
    h = np.asarray(x, np.float64) @ p["hidden"]["kernel"] + p["hidden"]["bias"]
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    h = (h - mu) / np.sqrt(var + 1e-5) * p["norm"]["scale"] + p["norm"]["bias"]
    h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
    return (h @ p["out"]["kernel"] + p["out"]["bias"])[:, 0]


def np_bce(logits, y):
    return float(np.mean(np.maximum(logits, 0) - logits * y + np.log1p(np.exp(-np.abs(logits)))))


def synthetic(seed, n_per_class=100, d=64, signal=2.0, offset=0.3, noise=0.3):
    """A harmful/benign direction shared by all languages, plus a per-language offset and noise."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    xs, ys, ls = [], [], []
    for lang in LANGS:
        off = rng.normal(size=d) * offset
        y = np.repeat([0, 1], n_per_class)
        xs.append(off + (2 * y - 1)[:, None] * direction * signal + rng.normal(size=(len(y), d)) * noise)
        ys.append(y)
        ls += [lang] * len(y)
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys), np.array(ls)


@pytest.fixture(scope="module")
def trained():
    x, y, langs = synthetic(0)
    cfg = ssi.default_ssi_config()
    cfg.layer = 7  # tolerated extra field, as the run config embeds it
    artifact, report = ssi.train_ssi(x, y, langs, cfg, {"layer": 7, "model_fingerprint": "fp-A"})
    return x, y, langs, artifact, report


# ----------------------------------------------------------------------------- model

def test_probe_matches_torch_module():
    """float32; |jax - torch| <= 1e-5 absolute on logits, deterministic / eval mode."""
    import torch
    d, h = 48, 32
    params = ssi.Probe(hidden=h).init(jax.random.PRNGKey(1), jnp.zeros((1, d)), deterministic=True)
    # Non-trivial LayerNorm affine, so its parameters are exercised too.
    params = jax.tree_util.tree_map(np.asarray, params)
    rng = np.random.default_rng(0)
    params["params"]["norm"]["scale"] = rng.normal(1.0, 0.2, h).astype(np.float32)
    params["params"]["norm"]["bias"] = rng.normal(0.0, 0.2, h).astype(np.float32)
    net = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.LayerNorm(h), torch.nn.GELU(),
                              torch.nn.Dropout(0.1), torch.nn.Linear(h, 1)).eval()
    p = params["params"]
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(p["hidden"]["kernel"].T.copy()))
        net[0].bias.copy_(torch.from_numpy(p["hidden"]["bias"].copy()))
        net[1].weight.copy_(torch.from_numpy(p["norm"]["scale"]))
        net[1].bias.copy_(torch.from_numpy(p["norm"]["bias"]))
        net[4].weight.copy_(torch.from_numpy(p["out"]["kernel"].T.copy()))
        net[4].bias.copy_(torch.from_numpy(p["out"]["bias"].copy()))
        x = rng.normal(0, 3, (16, d)).astype(np.float32)
        ref = net(torch.from_numpy(x))[:, 0].numpy()
    ours = np.asarray(ssi.Probe(hidden=h).apply(params, x, deterministic=True))
    assert ours.shape == (16,) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_probe_hidden_default_is_d_and_dropout_active_in_training():
    params = ssi.Probe().init(jax.random.PRNGKey(0), jnp.zeros((1, 12)), deterministic=True)
    assert params["params"]["hidden"]["kernel"].shape == (12, 12)
    x = jnp.ones((4, 12))
    a = ssi.Probe(dropout=0.5).apply(params, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    b = ssi.Probe(dropout=0.5).apply(params, x, deterministic=True)
    assert not np.allclose(a, b)


# ----------------------------------------------------------------------------- config and split

def test_config_fields_and_validation():
    cfg = ssi.default_ssi_config()
    assert set(cfg.keys()) == {
        "hidden", "dropout", "learning_rate", "weight_decay", "batch_size", "max_epochs",
        "grad_clip", "lr_patience", "lr_factor", "early_stop_patience", "val_fraction",
        "train_languages", "criterion", "max_fpr", "seed"}
    cfg.layer = 3
    cfg.batch_size_features = 8
    assert ssi._as_config(cfg).batch_size == 64  # extra fields are ignored, not rejected
    bad = ssi.default_ssi_config()
    bad.lr = 0.1
    with pytest.raises(ssi.SSIError, match="unknown field 'lr'"):
        ssi._as_config(bad)
    with pytest.raises(ssi.SSIError, match="criterion"):
        ssi._as_config({"criterion": "auc"})
    with pytest.raises(ssi.SSIError, match="field 'learning_rate'"):
        ssi._as_config({"learning_rate": "fast"})


def test_split_is_stratified_and_holds_out_other_languages():
    rng = np.random.default_rng(0)
    langs = np.array(rng.choice(LANGS, 2000))
    labels = rng.integers(0, 2, 2000)
    tr, va, ho = ssi.split_train_val(labels, langs, TRAIN_LANGS, 0.1, seed=3)
    assert len(np.intersect1d(tr, va)) == 0 and len(np.intersect1d(tr, ho)) == 0
    assert len(np.intersect1d(va, ho)) == 0
    assert len(tr) + len(va) + len(ho) == 2000
    assert set(langs[ho]) == set(LANGS) - set(TRAIN_LANGS)
    assert set(langs[tr]) == set(langs[va]) == set(TRAIN_LANGS)
    for lang in TRAIN_LANGS:
        for label in (0, 1):
            n = np.sum((langs == lang) & (labels == label))
            assert np.sum((langs[va] == lang) & (labels[va] == label)) == round(0.1 * n)
    again = ssi.split_train_val(labels, langs, TRAIN_LANGS, 0.1, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((tr, va, ho), again))
    with pytest.raises(ssi.SSIError, match="'ko' has no items"):
        ssi.split_train_val(labels[langs != "ko"], langs[langs != "ko"], TRAIN_LANGS, 0.1, seed=0)


# ----------------------------------------------------------------------------- training

def test_heldout_languages_generalise(trained):
    """Shared direction across 10 languages; trained on en/zh/ko only. Held-out accuracy >= 0.95."""
    _, _, _, artifact, report = trained
    per = report["per_language"]
    assert report["seen_languages"] == list(TRAIN_LANGS)
    assert report["heldout_languages"] == sorted(set(LANGS) - set(TRAIN_LANGS))
    assert per["all_heldout"]["accuracy"] >= 0.95
    assert per["all_heldout"]["n"] == 7 * 200
    assert per["all_seen"]["n"] == report["n_val"]
    assert all(per[l]["seen"] for l in TRAIN_LANGS) and not per["sw"]["seen"]
    assert 0.30 <= report["threshold"] <= 0.70 and artifact.threshold == report["threshold"]
    json.dumps(report)  # the report must be JSON-serialisable as is


def test_random_labels_stop_early_and_keep_best_epoch():
    """Pure label noise: validation loss stops improving, so training stops early; the returned
    params are the best epoch's (their float64 NumPy val loss matches the logged one within 1e-5)."""
    rng = np.random.default_rng(5)
    # Wide features and few items, so the probe memorises the noise and validation loss rises.
    x = rng.normal(size=(400, 128)).astype(np.float32)
    y = rng.integers(0, 2, 400)
    cfg = ssi.default_ssi_config()
    params, hist = ssi.train_probe(x[:300], y[:300], x[300:], y[300:], cfg, seed=0)
    assert hist["stopped_early"] is True
    assert hist["epochs_run"] < cfg.max_epochs
    assert hist["epochs_run"] == hist["best_epoch"] + 1 + cfg.early_stop_patience
    assert hist["best_epoch"] == int(np.argmin(hist["val_loss"]))
    own = np_bce(np_probe_logits(params, x[300:]), y[300:])
    assert abs(own - hist["val_loss"][hist["best_epoch"]]) <= 1e-5
    assert abs(own - hist["val_loss"][-1]) > 1e-4  # the last epoch's params were not returned
    # Learning-rate plateau rule, replayed independently from the logged validation losses.
    lr, best, bad, expected = cfg.learning_rate, math.inf, 0, []
    for v in hist["val_loss"]:
        expected.append(lr)
        if v < best:
            best, bad = v, 0
        else:
            bad += 1
            if bad % cfg.lr_patience == 0:
                lr *= cfg.lr_factor
    assert hist["lr"] == expected and min(hist["lr"]) < cfg.learning_rate


def test_last_partial_batch_is_masked():
    """With lr = 0 and no dropout, the epoch's train loss is the plain mean BCE over all 100 items
    (batch 64 -> last batch of 36 padded to 64). float32 vs float64 reference, tol 1e-5."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(100, 16)).astype(np.float32)
    y = rng.integers(0, 2, 100)
    cfg = ssi.default_ssi_config()
    cfg.learning_rate, cfg.dropout, cfg.max_epochs = 0.0, 0.0, 1
    params, hist = ssi.train_probe(x, y, x[:10], y[:10], cfg, seed=1)
    assert abs(hist["train_loss"][0] - np_bce(np_probe_logits(params, x), y)) <= 1e-5


# ----------------------------------------------------------------------------- threshold

GRID = [round(i * 0.01, 2) for i in range(30, 71)]


def _sk_scores(probs, labels, criterion, max_fpr=None):
    """Score of every grid threshold with sklearn (independent of ssi)."""
    out = {}
    for tau in GRID:
        pred = (np.asarray(probs) > tau).astype(int)
        if criterion == "accuracy":
            out[tau] = accuracy_score(labels, pred)
        elif criterion == "f1":
            out[tau] = f1_score(labels, pred, zero_division=0)
        elif criterion == "balanced_accuracy":
            out[tau] = balanced_accuracy_score(labels, pred)
        else:
            tn, fp, fn, tp = confusion_matrix(labels, pred, labels=[0, 1]).ravel()
            if fp / (fp + tn) <= max_fpr:
                out[tau] = tp / (tp + fn)
    return out


def _sweep_case(benign, harmful, criterion, hand_tau, hand_score, unique=True, max_fpr=None):
    probs = np.array(benign + harmful)
    labels = np.array([0] * len(benign) + [1] * len(harmful))
    tau, score = ssi.sweep_threshold(probs, labels, criterion, max_fpr=max_fpr)
    assert tau == hand_tau and score == pytest.approx(hand_score, abs=1e-12)
    sk = _sk_scores(probs, labels, criterion, max_fpr)
    best = max(sk.values())
    assert best == pytest.approx(hand_score, abs=1e-12)
    argmax = [t for t, v in sk.items() if abs(v - best) < 1e-12]
    if unique:
        assert argmax == [hand_tau]
    return argmax


def test_sweep_accuracy_unique_optimum():
    # Hand count: tau = 0.45 is the only grid point with 8/10 correct.
    _sweep_case([0.10, 0.20, 0.335, 0.445, 0.505], [0.455, 0.475, 0.60, 0.80, 0.25],
                "accuracy", 0.45, 0.8)


def test_sweep_f1_unique_optimum():
    # tau = 0.31: TP 5, FP 3, FN 0 -> F1 = 10/13; every other threshold is lower.
    _sweep_case([0.1] * 6 + [0.305, 0.345, 0.355, 0.365], [0.315, 0.325, 0.335, 0.9, 0.95],
                "f1", 0.31, 10 / 13)


def test_sweep_balanced_accuracy_unique_optimum():
    # tau = 0.43: TPR 2/2, TNR 7/8 -> 0.9375.
    _sweep_case([0.1] * 6 + [0.425, 0.455], [0.435, 0.465], "balanced_accuracy", 0.43, 0.9375)


def test_sweep_tpr_at_fpr_unique_optimum():
    # 20 benign; FPR <= 0.05 allows one false positive, first reached at tau = 0.51 (TPR 3/5).
    _sweep_case([0.1] * 17 + [0.405, 0.505, 0.605], [0.35, 0.45, 0.515, 0.65, 0.9],
                "tpr_at_fpr", 0.51, 0.6, max_fpr=0.05)
    with pytest.raises(ssi.SSIError, match="FPR <= 0.0"):
        ssi.sweep_threshold(np.array([0.9, 0.8]), np.array([0, 1]), "tpr_at_fpr", max_fpr=0.0)


def test_sweep_tie_rules():
    # Accuracy 9/10 at both 0.43 and 0.46 -> the one closer to 0.5.
    tied = _sweep_case([0.1] * 6 + [0.425, 0.455], [0.435, 0.465], "accuracy", 0.46, 0.9, unique=False)
    assert tied == [0.43, 0.46]
    # Perfect separation everywhere on the grid -> 0.5.
    assert ssi.sweep_threshold(np.array([0.1, 0.9]), np.array([0, 1]))[0] == 0.5
    # Best at 0.45 and 0.55, equally far from 0.5 -> the higher one.
    tied = _sweep_case([0.545], [0.455], "accuracy", 0.55, 0.5, unique=False)
    assert 0.45 in tied and 0.50 not in tied


# ----------------------------------------------------------------------------- metrics

def test_roc_auc_matches_sklearn_with_ties():
    """float64; |ours - sklearn| <= 1e-12."""
    rng = np.random.default_rng(0)
    for n in (2, 7, 300):
        y = rng.integers(0, 2, n)
        y[0], y[1] = 0, 1
        s = np.round(rng.random(n), 1)  # coarse rounding creates many ties
        assert abs(ssi.roc_auc(s, y) - roc_auc_score(y, s)) <= 1e-12
    assert ssi.roc_auc(np.array([0.1, 0.2]), np.array([1, 1])) is None


def test_per_language_metrics_match_confusion_matrix():
    """Exact integer counts; rates compared at 1e-12 (float64)."""
    rng = np.random.default_rng(1)
    n = 600
    langs = rng.choice(["en", "zh", "ko", "sw", "bn"], n)
    y = rng.integers(0, 2, n)
    p = np.clip(rng.normal(0.5 + 0.2 * (2 * y - 1), 0.2), 0, 1)
    tau = 0.47
    got = ssi.per_language_metrics(p, y, langs, tau, TRAIN_LANGS)
    groups = {l: langs == l for l in set(langs)}
    groups["all_seen"] = np.isin(langs, TRAIN_LANGS)
    groups["all_heldout"] = ~groups["all_seen"]
    assert set(got) == set(groups)
    for name, m in groups.items():
        tn, fp, fn, tp = confusion_matrix(y[m], (p[m] > tau).astype(int), labels=[0, 1]).ravel()
        g = got[name]
        assert (g["n"], g["n_harmful"]) == (m.sum(), tp + fn)
        assert abs(g["tpr"] - tp / (tp + fn)) <= 1e-12
        assert abs(g["fpr"] - fp / (fp + tn)) <= 1e-12
        assert abs(g["accuracy"] - (tp + tn) / m.sum()) <= 1e-12
        assert abs(g["roc_auc"] - roc_auc_score(y[m], p[m])) <= 1e-12
        assert g["seen"] == (name in TRAIN_LANGS or name == "all_seen")
    one_class = ssi.per_language_metrics(np.array([0.9, 0.2]), np.array([1, 1]), np.array(["sw", "sw"]),
                                         0.5, TRAIN_LANGS)
    assert one_class["sw"]["fpr"] is None and one_class["sw"]["roc_auc"] is None
    assert one_class["sw"]["tpr"] == 0.5 and "all_seen" not in one_class


# ----------------------------------------------------------------------------- artifact

def test_artifact_round_trip_is_exact(trained, tmp_path):
    x, _, _, artifact, _ = trained
    ssi.save_artifact(str(tmp_path), artifact.params, artifact.meta)
    assert sorted(os.listdir(tmp_path)) == ["ssi.json", "ssi.safetensors"]  # no temp files left
    loaded = ssi.load_artifact(str(tmp_path), model_fingerprint="fp-A", hidden_size=64, num_layers=7)
    assert np.array_equal(loaded.logits(x), artifact.logits(x))
    assert np.array_equal(loaded.verdicts(x), artifact.verdicts(x))
    assert loaded.layer == 7 and loaded.threshold == artifact.threshold
    meta = json.loads((tmp_path / "ssi.json").read_text())
    assert meta["feature"] == "last_real_token_raw_prompt" and meta["probe_hidden"] == 64
    # Verdicts are p > tau with p the logistic of the logits.
    p = 1 / (1 + np.exp(-artifact.logits(x).astype(np.float64)))
    assert np.array_equal(artifact.verdicts(x), p > artifact.threshold)


def test_artifact_errors(trained, tmp_path):
    _, _, _, artifact, _ = trained
    ssi.save_artifact(str(tmp_path), artifact.params, artifact.meta)
    with pytest.raises(ssi.SSIError, match="fingerprint 'fp-A'.*'fp-B'"):
        ssi.load_artifact(str(tmp_path), model_fingerprint="fp-B")
    with pytest.raises(ssi.SSIError, match="hidden_size=64.*4096"):
        ssi.load_artifact(str(tmp_path), hidden_size=4096)
    with pytest.raises(ssi.SSIError, match="layer 7 out of range 0..6"):
        ssi.load_artifact(str(tmp_path), num_layers=6)
    with pytest.raises(ssi.SSIError, match=r"features must be \(N, 64\)"):
        artifact.logits(np.zeros((2, 63), np.float32))
    os.remove(tmp_path / "ssi.safetensors")
    with pytest.raises(ssi.SSIError, match="ssi.safetensors: missing"):
        ssi.load_artifact(str(tmp_path))
    with pytest.raises(ssi.SSIError, match="ssi.json: missing"):
        ssi.load_artifact(str(tmp_path / "nowhere"))


def test_report_table_and_plot(trained, tmp_path):
    _, _, _, _, report = trained
    table = ssi.format_table(report)
    assert "held-out" in table and "all_heldout" in table and "sw" in table
    path = tmp_path / "per_language.png"
    figures.plot_per_language(report, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
