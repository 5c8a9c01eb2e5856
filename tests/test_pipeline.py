"""Stage wiring on the tiny default: feature invariances, bottleneck -> ssi end to end, CLI errors.

dtype float32 throughout; feature tolerance 1e-5 absolute."""
import json
import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from lasa_jax.config import base_config
from lasa_jax.data.readers import FIXTURES_DIR, read_parallel, read_prompts
from lasa_jax.method import gate
from lasa_jax.method import probe as ssi
from lasa_jax.model.features import extract_features
from lasa_jax.model.lm import load_model
from lasa_jax.model.tiny import make_tiny_checkpoint
from lasa_jax.runner import run
from lasa_jax import context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "model"), family="qwen2",
                                hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                                intermediate_size=64)


@pytest.fixture(scope="module")
def texts():
    prompts = read_prompts(os.path.join(FIXTURES_DIR, "ssi_prompts.json"))
    return [p.text for p in prompts[::23]]  # a spread of languages and lengths


def test_features_identical_under_padding_side_and_batch_composition(tiny, texts):
    lm = load_model(tiny)
    right = extract_features(lm, texts, batch_size=8, padding_side="right", progress=False)
    left = extract_features(lm, texts, batch_size=8, padding_side="left", progress=False)
    one = extract_features(lm, texts, batch_size=1, padding_side="right", progress=False)
    packed = extract_features(lm, texts, batch_size=4, progress=False)  # the default: packed rows
    perm = np.random.default_rng(0).permutation(len(texts))
    shuffled = extract_features(lm, [texts[i] for i in perm], batch_size=5, padding_side="left",
                                progress=False)
    np.testing.assert_allclose(left, right, atol=TOL, rtol=0)
    np.testing.assert_allclose(one, right, atol=TOL, rtol=0)
    np.testing.assert_allclose(packed, right, atol=TOL, rtol=0)
    np.testing.assert_allclose(shuffled, right[:, perm], atol=TOL, rtol=0)
    assert right.shape == (lm.cfg.num_layers + 1, len(texts), lm.cfg.hidden_size)


def _config(workdir, model_path, **kw):
    c = base_config()
    c.workdir = str(workdir)
    c.model.path = model_path
    c.model.dtype = c.model.param_dtype = "float32"
    c.bottleneck.bootstrap_draws = 50
    c.bottleneck.max_queries = 8
    c.ssi.max_epochs = 3
    c.progress = False
    c.stages = "bottleneck,ssi"
    c.align.z_mode = "ssi"
    for k, v in kw.items():
        section, field = k.split("__")
        setattr(getattr(c, section), field, v)
    c.lock()
    return c


def test_bottleneck_then_ssi_end_to_end(tiny, texts, tmp_path, monkeypatch):
    from sklearn.metrics import silhouette_score
    config = _config(tmp_path / "run", tiny)
    run(config)
    out = tmp_path / "run"
    report = json.loads((out / "bottleneck" / "report.json").read_text())
    assert 1 <= report["bottleneck_layer"] <= 3
    assert [e["layer"] for e in report["layers"]] == [0, 1, 2, 3]
    assert report["num_queries"] == 8 and report["num_languages"] == 10
    # The stage's silhouettes against scikit-learn on features recomputed independently of the
    # stage (float32 features, cosine distance; tolerance 1e-4 absolute).
    queries = read_parallel(os.path.join(FIXTURES_DIR, "parallel_harmful.json"))[:8]
    rows = [(q.qid, lang, text) for q in queries for lang, text in q.texts.items()]
    feats = extract_features(load_model(tiny), [t for _, _, t in rows], progress=False)
    for e in report["layers"][1:]:
        x = feats[e["layer"]]
        assert abs(e["s_sem"] - silhouette_score(x, [q for q, _, _ in rows], metric="cosine")) < 1e-4
        assert abs(e["s_lang"] - silhouette_score(x, [l for _, l, _ in rows], metric="cosine")) < 1e-4
    assert report["model_fingerprint"] == load_model(tiny).fingerprint
    for png in ("silhouette.png", "projection.png"):
        img = matplotlib.image.imread(out / "bottleneck" / png)
        assert img.shape[0] > 200 and img.shape[1] > 200 and img.std() > 0.01

    ssi_report = json.loads((out / "ssi" / "report.json").read_text())
    assert ssi_report["layer"] == report["bottleneck_layer"]
    assert 0.30 <= ssi_report["threshold"] <= 0.70
    assert set(ssi_report["per_language"]) >= {"en", "zh", "ko", "sw", "jv"}
    assert (out / "ssi" / "per_language.png").exists()

    # Scoring API: the artifact on the same model; batched == one-by-one, left or right padding.
    lm = load_model(tiny)
    art = ssi.load_artifact(str(out / "ssi"), model_fingerprint=lm.fingerprint,
                            hidden_size=lm.cfg.hidden_size, num_layers=lm.cfg.num_layers)
    batched = {side: art.probs(extract_features(lm, texts, [art.layer], batch_size=8, padding_side=side,
                                                progress=False)[0]) for side in ("left", "right")}
    single = np.array([art.probs(extract_features(lm, [t], [art.layer], progress=False)[0])[0] for t in texts])
    np.testing.assert_allclose(batched["left"], single, atol=TOL, rtol=0)
    np.testing.assert_allclose(batched["right"], single, atol=TOL, rtol=0)
    probs, flags = gate.score_prompts(lm, art, texts, batch_size=8)  # the scoring API itself
    np.testing.assert_allclose(probs, single, atol=TOL, rtol=0)
    np.testing.assert_array_equal(flags, probs > art.threshold)

    # Stage 3's z_mode="ssi": each KTO item is conditioned on the SSI's verdict for its prompt.
    from lasa_jax.data.readers import KTOPair
    from lasa_jax.stages.align import make_items
    verdicts = gate.ssi_verdicts(lm, texts, gate.load_for_model(lm, str(out / "ssi")))
    assert verdicts == {t: bool(v) for t, v in zip(texts, batched["right"] > art.threshold)}
    pairs = [KTOPair(prompt=t, chosen="no", rejected="yes", source="safety", idx=str(i))
             for i, t in enumerate(texts)]
    items = make_items(pairs, config.align, seed=0, verdicts=verdicts)
    assert [it.z for it in items] == [verdicts[t] for t in texts for _ in range(2)]

    # Rerunning reuses the feature cache (same weights, prompts, languages, layers): no feature
    # is extracted again, and the outputs are the same.
    def no_extraction(*args, **kw):
        raise AssertionError("features were extracted again instead of read from the cache")
    monkeypatch.setattr(context, "extract_features", no_extraction)  # both stages read features there
    run(config)
    again = json.loads((out / "bottleneck" / "report.json").read_text())
    assert again["layers"] == report["layers"]
    # The cache key names the languages read from the file: the same number of languages with
    # other codes is another entry.
    from lasa_jax.context import Context
    keys = []
    for langs in ("en,zh,it", "en,zh,ko"):
        c = _config(tmp_path / "run", tiny)
        c.unlock()
        c.data.languages = langs
        keys.append(Context(c).feature_cache_key(lm, ["a prompt", "another"], [1]))
    assert keys[0] != keys[1]
    # And the prompt texts themselves (whatever files or datasets they came from).
    assert Context(c).feature_cache_key(lm, ["a prompt", "other"], [1]) != keys[1]


def test_ssi_layer_out_of_range_is_one_line(tiny, tmp_path):
    config = _config(tmp_path / "run", tiny, ssi__layer=7)
    config.unlock()
    config.stages = "ssi"
    with pytest.raises(ValueError, match=r"^config\.ssi\.layer=7: out of range; this model has layers 0\.\.3"):
        run(config)


@pytest.mark.parametrize("args,needle", [
    (["--config.model.nope=1"], "bad --config override"),
    (["--config.stages=bottleneck", "--config.data.parallel_prompts=/nonexistent.csv"], "/nonexistent.csv:-: config.data.parallel_prompts: data file not found"),
])
def test_cli_errors_are_one_line(tmp_path, args, needle):
    proc = subprocess.run([sys.executable, "-m", "lasa_jax.main", "--config=configs/tiny.py",
                           f"--config.workdir={tmp_path}", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and needle in last
