"""Time stage-1 metrics against scikit-learn on the same random features, same machine.

    PYTHONPATH=. python bench/bottleneck.py [--d 512] [--layers 33] [--rounds 5] [--json PATH]

Ours: one `layer_metrics` call (S_sem, S_lang and the cosine stats for every layer).
sklearn: `silhouette_score(metric="cosine")` twice per layer (labels = query, = language).
Timing through bench/_timing.py: the first call of each side (our jit compile) is reported on its
own, then the sides alternate for --rounds rounds; the ratio is the median over rounds with its
min-max, withheld when the load average exceeds the core count. bootstrap_diff has no reference
and is timed once (first call, then one compiled call).
"""

import argparse
import os
import sys
import time

import jax
import numpy as np
from sklearn.metrics import silhouette_score

from lasa_jax.method import silhouette as bn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402


def _data(num_queries, num_languages, num_layers, d, seed=0):
    rng = np.random.default_rng(seed)
    n = num_queries * num_languages
    # A little shared structure so the silhouettes are not all ~0.
    qv = rng.normal(size=(num_queries, d))
    lv = rng.normal(size=(num_languages, d))
    qid = np.repeat(np.arange(num_queries), num_languages)
    lang = np.tile(np.arange(num_languages), num_queries)
    w = np.linspace(0.1, 0.9, num_layers)[:, None, None]
    feats = w * qv[qid] + (1 - w) * lv[lang] + rng.normal(size=(num_layers, n, d))
    return feats.astype(np.float32), qid, lang


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--layers", type=int, default=33)
    ap.add_argument("--bootstrap-draws", type=int, default=100,
                    help="also time bootstrap_diff with this many draws (0: skip)")
    _timing.add_arguments(ap)
    args = ap.parse_args()
    session = _timing.Session.from_args(args, "bottleneck")
    cases = [("70 prompts (10 q x 7 lang)", 10, 7), ("3000 prompts (300 q x 10 lang)", 300, 10)]
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; d={args.d}, {args.layers} layers")
    errors = {}
    for name, nq, nl in cases:
        feats, qid, lang = _data(nq, nl, args.layers, args.d)

        def sk():
            return np.array([
                silhouette_score(f, qid, metric="cosine")
                - silhouette_score(f, lang, metric="cosine")
                for f in feats
            ])

        res = session.compare(name, {"lasa_jax": lambda: bn.layer_metrics(feats, qid, lang),
                                     "scikit-learn": sk})
        errors[name] = float(np.abs(np.asarray(res.outputs["lasa_jax"]["diff"]) - res.outputs["scikit-learn"]).max())
        print(f"max |S_sem - S_lang error| vs scikit-learn: {errors[name]:.1e}")
        if args.bootstrap_draws:
            t = time.perf_counter()
            bn.bootstrap_diff(feats, qid, lang, args.bootstrap_draws, seed=0)
            first = time.perf_counter() - t
            t = time.perf_counter()
            bn.bootstrap_diff(feats, qid, lang, args.bootstrap_draws, seed=1)
            print(f"bootstrap_diff, {args.bootstrap_draws} draws: first call {first:.3f}s, "
                  f"then {time.perf_counter() - t:.3f}s (no reference)")
    return session.finish(extra={"max_abs_err": errors})


if __name__ == "__main__":
    sys.exit(main())
