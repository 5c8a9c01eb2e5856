"""Stage 1: find the semantic bottleneck layer from per-layer prompt features.

Works purely on feature arrays of shape (num_layers_captured, N, d): one row per prompt, the
prompt's last-real-token hidden state at each captured layer (layer 0 = embedding output,
k = after decoder block k, as HF hidden_states[k]). Each prompt carries a query id (the same
request in every language shares it) and a language.

Per layer: silhouettes with cosine distance (scikit-learn semantics) for labels = query id
(S_sem) and labels = language (S_lang), diff = S_sem - S_lang, and intra/inter cosine stats.
k* = argmax diff over layers >= 1. A bootstrap over queries gives CIs and the stability of k*.

All silhouettes use the identity Gram @ onehot = X @ (onehot^T X): per-cluster feature sums
turn the N x N distance work into N x C, so a whole 33-layer sweep of 3,000 prompts is one
jitted call.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


_HI = jax.lax.Precision.HIGHEST  # f32 matmuls must not drop to TF32/bf16 on accelerators
_DRAW_BATCH_ELEMENTS = 1 << 25   # bound on B*N*Q floats held at once by the bootstrap

__all__ = [
    "silhouette_samples",
    "silhouette_score",
    "layer_metrics",
    "bootstrap_diff",
    "analyse",
    "format_table",
]


# --------------------------------------------------------------------------- labels & checks


def _encode(labels: Sequence[Hashable], field: str) -> tuple[np.ndarray, list]:
    """Map arbitrary hashable labels to 0..C-1 in order of first appearance."""
    index: dict = {}
    codes = np.empty(len(labels), dtype=np.int32)
    for i, label in enumerate(labels):
        try:
            codes[i] = index.setdefault(label, len(index))
        except TypeError:
            raise ValueError(f"{field}[{i}]: label {label!r} is not hashable") from None
    return codes, list(index)


def _check_label_count(num_labels: int, n: int, field: str) -> None:
    # Same rule as scikit-learn: the silhouette is undefined outside 2 <= C <= N-1.
    if not 2 <= num_labels <= n - 1:
        raise ValueError(
            f"{field}: silhouette needs 2 <= number of distinct labels <= N-1, "
            f"got {num_labels} distinct labels for N={n}"
        )


def _check_features(features, query_ids, languages) -> tuple[int, int, int]:
    if getattr(features, "ndim", None) != 3:
        raise ValueError(
            f"features: expected shape (num_layers, N, d), got {np.shape(features)}"
        )
    num_layers, n, _ = features.shape
    if len(query_ids) != n:
        raise ValueError(f"query_ids: length {len(query_ids)} != N={n} rows of features")
    if len(languages) != n:
        raise ValueError(f"languages: length {len(languages)} != N={n} rows of features")
    finite = np.asarray(jnp.isfinite(jnp.asarray(features)).all(axis=(1, 2)))
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"features: non-finite values in captured layer index {bad}")
    return num_layers, n, features.shape[2]


# --------------------------------------------------------------------------- core maths


def _normalise(x: jax.Array) -> jax.Array:
    # Zero rows stay zero (as sklearn.preprocessing.normalize) instead of becoming NaN.
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, jnp.finfo(x.dtype).tiny)


# Mean cosine distances below this are float32 rounding of 1 - cos for identical directions
# (e.g. every prompt's layer-0 feature when all prompts end in the same token): the silhouette is
# then 0, as sklearn gives for exactly identical points, not a +-1 made of rounding noise.
_DEGENERATE = 1e-6


def _ratio(a: jax.Array, b: jax.Array) -> jax.Array:
    top = jnp.maximum(a, b)
    ok = top > _DEGENERATE
    return jnp.where(ok, (b - a) / jnp.where(ok, top, 1.0), 0.0)


def _cluster_cos_sums(x: jax.Array, onehot: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(C, d) per-cluster feature sums and (N, C) sums of cosines to each cluster."""
    sums = jnp.matmul(onehot.T, x, precision=_HI)
    return sums, jnp.matmul(x, sums.T, precision=_HI)


def _silhouette_from_sums(cos_sums, sq, labels, onehot) -> jax.Array:
    counts = onehot.sum(axis=0)
    own_count = counts[labels]
    dist_sums = counts[None, :] - cos_sums  # sum_j (1 - cos_ij) including j = i
    # Remove the i = j term (distance 1 - |x_i|^2, i.e. ~0 but 1 for a zero row) exactly.
    own = jnp.take_along_axis(dist_sums, labels[:, None], axis=1)[:, 0] - (1.0 - sq)
    a = own / jnp.maximum(own_count - 1.0, 1.0)
    b = jnp.min(jnp.where(onehot > 0, jnp.inf, dist_sums / counts[None, :]), axis=1)
    return jnp.where(own_count > 1, _ratio(a, b), 0.0)


@functools.partial(jax.jit, static_argnames=("num_clusters",))
def _silhouette_samples_jit(x, labels, num_clusters):
    x = _normalise(x.astype(jnp.float32))
    onehot = jax.nn.one_hot(labels, num_clusters, dtype=jnp.float32)
    _, cos_sums = _cluster_cos_sums(x, onehot)
    return _silhouette_from_sums(cos_sums, jnp.sum(x * x, axis=1), labels, onehot)


def silhouette_samples(x, labels: Sequence[Hashable]) -> jax.Array:
    """Per-sample silhouette, cosine distance on L2-normalised float32 rows.

    Same definition as sklearn.metrics.silhouette_samples(x, labels, metric="cosine"),
    including s = 0 for members of singleton clusters.
    """
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x: expected shape (N, d), got {x.shape}")
    if len(labels) != x.shape[0]:
        raise ValueError(f"labels: length {len(labels)} != N={x.shape[0]} rows of x")
    codes, names = _encode(labels, "labels")
    _check_label_count(len(names), x.shape[0], "labels")
    return _silhouette_samples_jit(x, jnp.asarray(codes), num_clusters=len(names))


def silhouette_score(x, labels: Sequence[Hashable]) -> float:
    """Mean silhouette (sklearn.metrics.silhouette_score with metric="cosine")."""
    return float(jnp.mean(silhouette_samples(x, labels)))


def _cos_stats(sums, total, sq_sum, counts, n):
    """Mean cosine over ordered pairs i != j in the same cluster, and across clusters."""
    intra_sum = jnp.sum(sums * sums) - sq_sum
    intra_cnt = jnp.sum(counts * (counts - 1.0))
    all_sum = jnp.sum(total * total) - sq_sum
    all_cnt = n * (n - 1.0)
    intra = intra_sum / intra_cnt
    inter = (all_sum - intra_sum) / (all_cnt - intra_cnt)
    return intra, inter


@functools.partial(jax.jit, static_argnames=("num_queries", "num_languages"))
def _layer_metrics_jit(features, q, lang, num_queries, num_languages):
    q_onehot = jax.nn.one_hot(q, num_queries, dtype=jnp.float32)
    l_onehot = jax.nn.one_hot(lang, num_languages, dtype=jnp.float32)
    n = jnp.float32(q.shape[0])

    def one_layer(x):
        x = _normalise(x.astype(jnp.float32))
        sq = jnp.sum(x * x, axis=1)
        q_sums, q_cos = _cluster_cos_sums(x, q_onehot)
        l_sums, l_cos = _cluster_cos_sums(x, l_onehot)
        s_sem = jnp.mean(_silhouette_from_sums(q_cos, sq, q, q_onehot))
        s_lang = jnp.mean(_silhouette_from_sums(l_cos, sq, lang, l_onehot))
        total = jnp.sum(x, axis=0)
        intra_l, inter_l = _cos_stats(l_sums, total, sq.sum(), l_onehot.sum(0), n)
        intra_q, inter_q = _cos_stats(q_sums, total, sq.sum(), q_onehot.sum(0), n)
        return {
            "s_sem": s_sem,
            "s_lang": s_lang,
            "diff": s_sem - s_lang,
            "cos_intra_lang": intra_l,
            "cos_inter_lang": inter_l,
            "cos_gap_lang": intra_l - inter_l,
            "cos_intra_query": intra_q,
            "cos_inter_query": inter_q,
            "cos_gap_query": intra_q - inter_q,
        }

    # lax.map, not vmap: one layer's temporaries at a time keeps memory at O(N*(Q + d)).
    return jax.lax.map(one_layer, features)


def _prepare(features, query_ids, languages):
    _check_features(features, query_ids, languages)
    n = features.shape[1]
    q, q_names = _encode(query_ids, "query_ids")
    lang, l_names = _encode(languages, "languages")
    _check_label_count(len(q_names), n, "query_ids")
    _check_label_count(len(l_names), n, "languages")
    return jnp.asarray(features), q, q_names, lang, l_names


def layer_metrics(features, query_ids, languages) -> dict[str, np.ndarray]:
    """Per-layer metrics, each a float32 array of shape (num_layers_captured,).

    Keys: s_sem, s_lang, diff, cos_intra_lang, cos_inter_lang, cos_gap_lang,
    cos_intra_query, cos_inter_query, cos_gap_query (cosines are means over ordered pairs
    of distinct prompts).
    """
    feats, q, q_names, lang, l_names = _prepare(features, query_ids, languages)
    out = _layer_metrics_jit(
        feats, jnp.asarray(q), jnp.asarray(lang),
        num_queries=len(q_names), num_languages=len(l_names),
    )
    return {k: np.asarray(v) for k, v in out.items()}


# --------------------------------------------------------------------------- bootstrap


@functools.partial(
    jax.jit,
    static_argnames=("num_queries", "num_languages", "distinct", "batch", "unique_cells"),
)
def _weighted_diff_jit(
    features, q, lang, weights, num_queries, num_languages, distinct, batch, unique_cells
):
    """diff per (layer, weight vector); weights[b, q] = how often query q was drawn.

    A resampled data set is the original one with query q repeated weights[q] times, so
    every silhouette term is a weighted sum over the original prompts: per layer we keep
    the (N, Q, Lg) cosine sums between each prompt and each (query, language) cell, and a
    draw is a matmul with its weights -- no N x N matrix per draw.
    """
    nq, nl = num_queries, num_languages
    cell = jax.nn.one_hot(q * nl + lang, nq * nl, dtype=jnp.float32)
    cell_counts = cell.sum(0).reshape(nq, nl)
    q_counts = cell_counts.sum(1)
    q_mask = jax.nn.one_hot(q, nq, dtype=jnp.bool_)
    l_mask = jax.nn.one_hot(lang, nl, dtype=jnp.bool_)
    own_q_count = q_counts[q]
    own_cell_counts = cell_counts[q]
    n = q.shape[0]

    def one_layer(x):
        x = _normalise(x.astype(jnp.float32))
        sq = jnp.sum(x * x, axis=1)
        if unique_cells:
            # One prompt per (query, language): the cell sums are a row gather, which
            # saves the N x P x d one-hot matmul (P = Q * Lg ~ N).
            rows = jnp.argmax(cell, axis=0)
            sums = jnp.where(cell.sum(0)[:, None] > 0, x[rows], 0.0)
            cell_cos = jnp.matmul(x, sums.T, precision=_HI)
        else:
            _, cell_cos = _cluster_cos_sums(x, cell)
        cell_cos = cell_cos.reshape(-1, nq, nl)
        # Semantic side: query clusters keep their members, only which queries exist and
        # the prompt weights change between draws.
        q_dist = q_counts[None, :] - cell_cos.sum(-1)
        own = jnp.take_along_axis(q_dist, q[:, None], axis=1)[:, 0] - (1.0 - sq)
        a_sem = own / jnp.maximum(own_q_count - 1.0, 1.0)
        other_q = jnp.where(q_mask, jnp.inf, q_dist / q_counts[None, :])
        # A second copy of the own query: same members, one of them an exact duplicate.
        copy_b = own / own_q_count
        own_cell_cos = jnp.take_along_axis(cell_cos, q[:, None, None], axis=1)[:, 0]

        def one_draw(m):
            w = m[q]
            drawn = w > 0
            b = jnp.min(jnp.where(m[None, :] > 0, other_q, jnp.inf), axis=1)
            if distinct:
                b = jnp.minimum(b, jnp.where(w >= 2, copy_b, jnp.inf))
            ok = drawn & (own_q_count > 1) & jnp.isfinite(b)
            s_sem = jnp.where(ok, _ratio(a_sem, jnp.where(ok, b, 0.0)), 0.0)

            l_cos = jnp.einsum("iql,q->il", cell_cos, m, precision=_HI)
            l_counts = jnp.broadcast_to(jnp.matmul(m, cell_counts, precision=_HI), (n, nl))
            if not distinct:
                # Only i's own copy of its query takes part; the other copies are exact
                # duplicates of it and would over-weight same-query pairs.
                extra = (w - 1.0)[:, None]
                l_cos = l_cos - extra * own_cell_cos
                l_counts = l_counts - extra * own_cell_counts
            w_own = w if distinct else jnp.ones_like(w)
            own_l_count = jnp.take_along_axis(l_counts, lang[:, None], axis=1)[:, 0]
            own_l_cos = jnp.take_along_axis(l_cos, lang[:, None], axis=1)[:, 0]
            # Copies of i itself are at distance 0: they only matter through the count.
            dist = (own_l_count - w_own) - (own_l_cos - w_own * sq)
            denom = own_l_count - 1.0
            a_lang = dist / jnp.maximum(denom, 1.0)
            mean_l = (l_counts - l_cos) / jnp.maximum(l_counts, 1.0)
            b_lang = jnp.min(jnp.where(l_mask | (l_counts == 0), jnp.inf, mean_l), axis=1)
            ok = drawn & (denom > 0) & jnp.isfinite(b_lang)
            s_lang = jnp.where(ok, _ratio(a_lang, jnp.where(ok, b_lang, 0.0)), 0.0)
            total = jnp.sum(w)
            return (jnp.sum(w * s_sem) - jnp.sum(w * s_lang)) / total

        return jax.lax.map(one_draw, weights, batch_size=batch)

    return jax.lax.map(one_layer, features)


def _weighted_diff(features, query_ids, languages, weights, *, duplicates="exclude"):
    """diff for explicit query weights: (num_draws, num_queries) -> (num_draws, layers).

    Query columns follow the order of first appearance in query_ids.
    """
    if duplicates not in ("exclude", "distinct"):
        raise ValueError(f"duplicates: expected 'exclude' or 'distinct', got {duplicates!r}")
    feats, q, q_names, lang, l_names = _prepare(features, query_ids, languages)
    weights = np.asarray(weights, dtype=np.float32)
    if weights.ndim != 2 or weights.shape[1] != len(q_names):
        raise ValueError(
            f"weights: expected shape (draws, {len(q_names)}), got {weights.shape}"
        )
    n = feats.shape[1]
    batch = int(max(1, min(len(weights), _DRAW_BATCH_ELEMENTS // (n * len(q_names)))))
    out = _weighted_diff_jit(
        feats, jnp.asarray(q), jnp.asarray(lang), jnp.asarray(weights),
        num_queries=len(q_names), num_languages=len(l_names),
        distinct=duplicates == "distinct", batch=batch,
        unique_cells=bool(len(set(zip(q.tolist(), lang.tolist()))) == n),
    )
    return np.asarray(out).T


def bootstrap_diff(
    features, query_ids, languages, draws: int, seed: int, *, duplicates: str = "exclude"
) -> np.ndarray:
    """Bootstrap over queries: (draws, num_layers_captured) array of S_sem - S_lang.

    Each draw resamples the queries with replacement; all languages of a query go together.
    A query drawn m times contributes m copies of its prompts (each copy weighted as a
    separate query). How a prompt sees the other copies of its own query:
      - "exclude" (default): not at all -- only its own copy takes part, the way the
        silhouette already skips the pair (i, i). Copies are exact duplicates: counted as
        neighbours they would make a duplicated prompt's nearest other query its own copy
        (s_sem = -1/n_q) and put m-fold weight on its same-query neighbours in other
        languages; about 63 % of a resample is duplicated, so the literal resample sits
        far from the point estimate. With all weights 0/1 both modes equal sklearn on the
        subset.
      - "distinct": the literal resample, each copy with its own query label and copies as
        ordinary points; equals sklearn on the explicitly resampled data.
    A residual upward bias remains in either mode: a resample holds ~63 % of the distinct
    queries, so the nearest other query (b of S_sem) is a min over fewer clusters. On
    synthetic data with 10 queries it was ~+0.01 in diff (about one bootstrap s.d.).
    """
    if draws < 1:
        raise ValueError(f"draws: expected >= 1, got {draws}")
    _, q_names = _encode(query_ids, "query_ids")
    nq = len(q_names)
    weights = np.random.default_rng(seed).multinomial(nq, np.full(nq, 1.0 / nq), size=draws)
    return _weighted_diff(features, query_ids, languages, weights, duplicates=duplicates)


# --------------------------------------------------------------------------- report


def analyse(
    features,
    layers: Sequence[int],
    query_ids: Sequence[Hashable],
    languages: Sequence[Hashable],
    *,
    bootstrap_draws: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    num_layers: int | None = None,
    num_runner_ups: int = 3,
    duplicates: str = "exclude",
) -> dict[str, Any]:
    """The stage-1 report (JSON-serialisable). See the module docstring for definitions.

    layers[j] is the model layer index of features[j]; num_layers (L, the number of
    decoder blocks) defaults to max(layers). Layer 0 is reported but never chosen.
    """
    layers = [int(k) for k in layers]
    if len(layers) != np.shape(features)[0]:
        raise ValueError(
            f"layers: {len(layers)} indices for {np.shape(features)[0]} captured layers"
        )
    if len(set(layers)) != len(layers) or min(layers, default=0) < 0:
        raise ValueError(f"layers: expected distinct indices >= 0, got {layers}")
    selectable = np.array([k >= 1 for k in layers])
    if not selectable.any():
        raise ValueError("layers: no layer >= 1 to choose the bottleneck from")
    if not 0 < ci < 1:
        raise ValueError(f"ci: expected 0 < ci < 1, got {ci}")
    if bootstrap_draws < 0:
        raise ValueError(f"bootstrap_draws: expected >= 0, got {bootstrap_draws}")
    big_l = max(layers) if num_layers is None else int(num_layers)
    if big_l < max(layers):
        raise ValueError(f"num_layers: {big_l} < largest captured layer {max(layers)}")

    metrics = layer_metrics(features, query_ids, languages)
    diff = metrics["diff"].astype(np.float64)
    masked = np.where(selectable, diff, -np.inf)
    best = int(np.argmax(masked))
    order = [int(j) for j in np.argsort(-masked, kind="stable") if selectable[j]]

    boot = None
    if bootstrap_draws:
        boot = bootstrap_diff(
            features, query_ids, languages, bootstrap_draws, seed, duplicates=duplicates
        ).astype(np.float64)
        lo, hi = np.quantile(boot, [(1 - ci) / 2, 1 - (1 - ci) / 2], axis=0)
        winners = np.argmax(np.where(selectable[None, :], boot, -np.inf), axis=1)
        freq = np.bincount(winners, minlength=len(layers)) / bootstrap_draws

    rows = []
    for j, k in enumerate(layers):
        row = {"layer": k, "selectable": bool(selectable[j])}
        row.update({name: float(v[j]) for name, v in metrics.items()})
        if boot is not None:
            row.update(
                diff_ci_low=float(lo[j]),
                diff_ci_high=float(hi[j]),
                diff_boot_std=float(boot[:, j].std(ddof=1)) if bootstrap_draws > 1 else 0.0,
                argmax_fraction=float(freq[j]),
            )
        else:
            row.update(diff_ci_low=None, diff_ci_high=None)
        rows.append(row)

    runner_ups = []
    for j in order[1 : 1 + num_runner_ups]:
        entry = {"layer": layers[j], "diff": float(diff[j]), "margin": float(diff[best] - diff[j])}
        if boot is not None:
            entry["p_bottleneck_higher"] = float(np.mean(boot[:, best] > boot[:, j]))
        runner_ups.append(entry)

    _, q_names = _encode(query_ids, "query_ids")
    _, l_names = _encode(languages, "languages")
    report = {
        "bottleneck_layer": layers[best],
        "num_layers": big_l,
        "relative_depth": layers[best] / big_l,
        "diff_at_bottleneck": float(diff[best]),
        "num_prompts": int(np.shape(features)[1]),
        "num_queries": len(q_names),
        "num_languages": len(l_names),
        "languages": [str(x) for x in l_names],
        "layers": rows,
        "runner_ups": runner_ups,
        "bootstrap": None,
    }
    if boot is not None:
        report["bootstrap"] = {
            "draws": int(bootstrap_draws),
            "ci": float(ci),
            "seed": int(seed),
            "resample": "queries",
            "duplicates": duplicates,
            "bottleneck_fraction": float(freq[best]),
            "argmax_fraction": [
                {"layer": layers[j], "fraction": float(freq[j])}
                for j in np.argsort(-freq, kind="stable") if freq[j] > 0
            ],
        }
    return report


# --------------------------------------------------------------------------- text & files


def format_table(report: dict) -> str:
    """Fixed-width per-layer table for the terminal, k* marked."""
    boot = report.get("bootstrap")
    ci_head = f"{100 * boot['ci']:.0f}% CI of diff" if boot else "CI of diff"
    head = f"{'layer':>5}  {'S_sem':>8}  {'S_lang':>8}  {'diff':>8}  {ci_head:>21}  {'P(k*)':>6}"
    lines = [head, "-" * len(head)]
    for r in report["layers"]:
        if r.get("diff_ci_low") is not None:
            ci_txt = f"[{r['diff_ci_low']:+.4f}, {r['diff_ci_high']:+.4f}]"
            frac = f"{r['argmax_fraction']:6.3f}"
        else:
            ci_txt, frac = "-", "-"
        mark = "  <- k*" if r["layer"] == report["bottleneck_layer"] else ""
        if r["layer"] == 0:
            mark = "  (embeddings, not selectable)"
        lines.append(
            f"{r['layer']:>5}  {r['s_sem']:>+8.4f}  {r['s_lang']:>+8.4f}  {r['diff']:>+8.4f}"
            f"  {ci_txt:>21}  {frac:>6}{mark}"
        )
    lines.append(
        f"bottleneck k* = {report['bottleneck_layer']} of L = {report['num_layers']} "
        f"(relative depth {report['relative_depth']:.2f})"
        + (f"; argmax in {100 * boot['bottleneck_fraction']:.1f}% of {boot['draws']} "
           f"bootstrap draws" if boot else "")
    )
    return "\n".join(lines)
