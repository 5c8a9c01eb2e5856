"""World v4's reported-never-used diagnostics (world.py, v4 change 9), on a toy checkpoint.

None of these chooses anything (not the layer, not a threshold, not a learning rate); they show
where meaning lives in the model besides the specified feature (the raw prompt's last token):

- `chat`: S_sem / S_lang of the bottleneck prompts read at the end of the chat-templated prompt;
- `centred`: S_sem / S_lang of the raw features after subtracting each language's mean feature
  (per layer): a language-neutral component under a per-language offset shows up here;
- `retrieval`: per layer, the share of mid/low-language bottleneck prompts whose nearest
  high-tier query centroid (cosine) is their own query (chance 1/12);
- `ssi_per_layer`: the SSI stage's probe trained on the high tier at every layer, its held-out
  ROC-AUC and seen-language accuracy;
- `meaning_position`: S_sem / S_lang at the answer's "then" in "request + answer head" (the
  position whose next token is the first clause constituent).
"""
from __future__ import annotations

import json
import os

import numpy as np

from lasa_jax.toyworld import world


def _curve(features, qids, langs) -> list[dict]:
    from lasa_jax.method.silhouette import layer_metrics
    m = layer_metrics(features, qids, langs)
    return [{"layer": k, "s_sem": float(m["s_sem"][k]), "s_lang": float(m["s_lang"][k]), "diff": float(m["diff"][k])}
            for k in range(len(m["diff"]))]


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def retrieval(features: np.ndarray, qids, langs) -> list[float]:
    """Per layer: accuracy of nearest high-tier query centroid for the mid/low prompts."""
    qids, langs = np.asarray(qids), np.asarray(langs)
    names = sorted(set(qids.tolist()))
    high = np.isin(langs, world.HIGH)
    out = []
    for f in features:
        u = _unit(f.astype(np.float64))
        cent = _unit(np.stack([u[high & (qids == q)].mean(0) for q in names]))
        pred = np.asarray(names)[np.argmax(u[~high] @ cent.T, axis=1)]
        out.append(float(np.mean(pred == qids[~high])))
    return out


def centred(features: np.ndarray, langs) -> np.ndarray:
    langs = np.asarray(langs)
    out = features.astype(np.float32).copy()
    for c in set(langs.tolist()):
        out[:, langs == c] -= out[:, langs == c].mean(axis=1, keepdims=True)
    return out


def run_diagnostics(model: str, out_path: str | None = None, *, ssi_sweep: bool = True) -> dict:
    from lasa_jax.model.features import extract_features
    from lasa_jax.model.lm import load_model
    from lasa_jax.method.probe import train_ssi
    from lasa_jax.toyworld.config import toy_config
    from lasa_jax.toyworld.judge import ToyJudge, words
    with open(os.path.join(model, "toyworld.json"), encoding="utf-8") as f:
        info = json.load(f)
    judge = ToyJudge(int(info["seed"]), int(info.get("world_version", 1)))
    lm = load_model(model)
    layers = list(range(lm.cfg.num_layers + 1))
    with open(os.path.join(model, "data", "parallel_prompts.json"), encoding="utf-8") as f:
        par = json.load(f)
    texts, qids, langs = [], [], []
    for rec in par:
        for c, t in rec["texts"].items():
            texts.append(t), qids.append(rec["id"]), langs.append(c)
    raw = extract_features(lm, texts, layers, batch_size=128, progress=False)
    chat = extract_features(lm, texts, layers, batch_size=128, chat_template=True, progress=False)
    heads = []
    for t in texts:  # request + answer up to and including "then"
        code, q = judge.parse_request(t)
        lang = judge.langs[code]
        ans = words(lang.answer(q.verb, q.obj, q.person))
        heads.append(t + " " + " ".join(ans[:ans.index(lang.words["then"]) + 1]))
    meaning = extract_features(lm, heads, layers, batch_size=128, progress=False)
    out = {"raw": _curve(raw, qids, langs), "chat": _curve(chat, qids, langs),
           "centred": _curve(centred(raw, langs), qids, langs),
           "retrieval": retrieval(raw, qids, langs), "retrieval_chat": retrieval(chat, qids, langs),
           "meaning_position": _curve(meaning, qids, langs)}
    if ssi_sweep:
        with open(os.path.join(model, "data", "ssi_prompts.json"), encoding="utf-8") as f:
            recs = json.load(f)
        feats = extract_features(lm, [r["prompt"] for r in recs], layers, batch_size=128, progress=False)
        labels = np.array([bool(r["harmful"]) for r in recs], np.int32)
        rl = [r["language"] for r in recs]
        cfg = toy_config(model).ssi  # the SSI stage's settings, its seed included
        rows = []
        for k in layers[1:]:
            _, rep = train_ssi(feats[k], labels, rl, cfg, meta={"layer": k})
            per = rep["per_language"]
            rows.append({"layer": k, "heldout_auc": per["all_heldout"]["roc_auc"],
                         "heldout_accuracy": per["all_heldout"]["accuracy"], "seen_accuracy": per["all_seen"]["accuracy"]})
        out["ssi_per_layer"] = rows
    if out_path:
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return out
