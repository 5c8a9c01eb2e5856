"""Time stage-1 metrics against scikit-learn on the same random features, same machine.

    PYTHONPATH=. python bench/bottleneck.py [--d 512] [--layers 33] [--repeats 3]

Ours: one `layer_metrics` call (S_sem, S_lang and the cosine stats for every layer).
sklearn: `silhouette_score(metric="cosine")` twice per layer (labels = query, = language).
First-call time (jit compile + run) is reported separately and excluded from the ratio.
"""

import argparse
import time

import jax
import numpy as np
from sklearn.metrics import silhouette_score

from lasa_jax.method import silhouette as bn


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


def _best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--layers", type=int, default=33)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bootstrap-draws", type=int, default=100,
                    help="also time bootstrap_diff with this many draws (0: skip)")
    args = ap.parse_args()
    cases = [("70 prompts (10 q x 7 lang)", 10, 7), ("3000 prompts (300 q x 10 lang)", 300, 10)]
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; d={args.d}, "
          f"{args.layers} layers, best of {args.repeats}")
    rows = []
    for name, nq, nl in cases:
        feats, qid, lang = _data(nq, nl, args.layers, args.d)
        t = time.perf_counter()
        ours = bn.layer_metrics(feats, qid, lang)
        first = time.perf_counter() - t
        ours_t, ours = _best_of(lambda: bn.layer_metrics(feats, qid, lang), args.repeats)

        def sk():
            return np.array([
                silhouette_score(f, qid, metric="cosine")
                - silhouette_score(f, lang, metric="cosine")
                for f in feats
            ])

        sk_t, sk_diff = _best_of(sk, 1 if nq * nl > 1000 else args.repeats)
        err = float(np.abs(ours["diff"] - sk_diff).max())
        boot_t = boot_first = float("nan")
        if args.bootstrap_draws:
            t = time.perf_counter()
            bn.bootstrap_diff(feats, qid, lang, args.bootstrap_draws, seed=0)
            boot_first = time.perf_counter() - t
            boot_t, _ = _best_of(
                lambda: bn.bootstrap_diff(feats, qid, lang, args.bootstrap_draws, seed=1), 1)
        rows.append((name, first, ours_t, sk_t, sk_t / ours_t, err, boot_first, boot_t))
        print(f"  done: {name}", flush=True)

    head = (f"{'case':<31} {'ours 1st':>9} {'ours':>8} {'sklearn':>8} {'sk/ours':>8} "
            f"{'max|diff err|':>13} {f'boot{args.bootstrap_draws} 1st':>12} "
            f"{f'boot{args.bootstrap_draws}':>9}")
    print(head)
    print("-" * len(head))
    for name, first, ours_t, sk_t, ratio, err, b1, bt in rows:
        print(f"{name:<31} {first:>8.3f}s {ours_t:>7.3f}s {sk_t:>7.3f}s {ratio:>7.1f}x "
              f"{err:>13.1e} {b1:>11.3f}s {bt:>8.3f}s")


if __name__ == "__main__":
    main()
