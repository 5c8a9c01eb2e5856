"""Every figure the stages write, as PNG (matplotlib's Agg canvas: no pyplot state, nothing to
close): the silhouette curves and feature projections of stage 1, the SSI's per-language rates
of stage 2, and the per-language ASR of stage 4."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from lasa_jax.infra.fileio import atomic_write
from lasa_jax.method.probe import ALL_HELDOUT, ALL_SEEN
from lasa_jax.method.silhouette import _encode


def _save(fig, path: str | os.PathLike, **kw) -> None:
    """PNG written whole or not at all, locally or to a URL (the format follows the extension)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, **kw))


def _new_figure(width: float, height: float, dpi: int = 110):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on the Agg canvas: no pyplot global state, nothing to close.
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def plot_silhouette(report: dict, path: str | os.PathLike):
    """S_sem, S_lang and their difference (with bootstrap CI band) against layer."""
    rows = report["layers"]
    ks = np.array([r["layer"] for r in rows])
    fig = _new_figure(8, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(ks, [r["s_sem"] for r in rows], "o-", ms=3, label="S_sem (labels = query)")
    ax.plot(ks, [r["s_lang"] for r in rows], "s-", ms=3, label="S_lang (labels = language)")
    ax.plot(ks, [r["diff"] for r in rows], "k-", lw=2, label="S_sem - S_lang")
    if rows[0].get("diff_ci_low") is not None:
        boot = report.get("bootstrap") or {}
        ax.fill_between(
            ks, [r["diff_ci_low"] for r in rows], [r["diff_ci_high"] for r in rows],
            color="k", alpha=0.15, lw=0,
            label=f"{100 * boot.get('ci', 0.95):.0f}% bootstrap CI (queries)",
        )
    k = report["bottleneck_layer"]
    ax.axvline(k, color="tab:red", ls="--", lw=1.2)
    ax.annotate(
        f"k* = {k} ({100 * report['relative_depth']:.0f}% depth)",
        xy=(k, 1.0), xycoords=("data", "axes fraction"), xytext=(4, -14),
        textcoords="offset points", color="tab:red",
    )
    ax.axhline(0, color="0.6", lw=0.6)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("silhouette (cosine)")
    ax.set_title(
        f"Semantic bottleneck: {report['num_queries']} queries x "
        f"{report['num_languages']} languages"
    )
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return fig


def _pca2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2-D PCA of L2-normalised rows; returns coordinates and explained-variance ratios."""
    x = x.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    x = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    var = s**2
    ratio = var[:2] / var.sum() if var.sum() > 0 else np.zeros(2)
    coords = u[:, :2] * s[:2]
    if coords.shape[1] < 2:  # a single feature dimension
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
        ratio = np.pad(ratio, (0, 2 - ratio.shape[0]))
    return coords, ratio


def plot_projection(features, layers, query_ids, languages, show_layers, path):
    """2-D PCA at show_layers; row 1 coloured by language, row 2 by query."""
    layers = [int(k) for k in layers]
    missing = [k for k in show_layers if k not in layers]
    if missing:
        raise ValueError(f"show_layers: layers {missing} are not among the captured {layers}")
    q, q_names = _encode(query_ids, "query_ids")
    lang, l_names = _encode(languages, "languages")
    from matplotlib import colormaps

    l_colors = colormaps["tab10" if len(l_names) <= 10 else "tab20"]
    q_colors = colormaps["tab20"]
    cols = len(show_layers)
    fig = _new_figure(3.6 * cols, 7.0)
    grid = fig.subplots(2, cols, squeeze=False)  # fig.axes is then row-major
    for c, k in enumerate(show_layers):
        coords, ratio = _pca2(np.asarray(features[layers.index(k)], dtype=np.float32))
        for r in range(2):
            ax = grid[r, c]
            if r == 0:
                for li, name in enumerate(l_names):
                    sel = lang == li
                    ax.scatter(*coords[sel].T, s=10, color=l_colors(li % l_colors.N),
                               label=str(name))
                ax.set_title(f"layer {k}: by language", fontsize=10)
            else:
                ax.scatter(*coords.T, s=10, c=[q_colors(i % q_colors.N) for i in q])
                ax.set_title(f"layer {k}: by query ({len(q_names)})", fontsize=10)
            ax.set_xlabel(f"PC1 ({100 * ratio[0]:.0f}%)")
            ax.set_ylabel(f"PC2 ({100 * ratio[1]:.0f}%)")
            ax.tick_params(labelsize=7)
    fig.axes[0].legend(fontsize=7, markerscale=1.5, loc="best", title="language",
                       title_fontsize=7)
    fig.suptitle("PCA of last-token features (L2-normalised)")
    fig.tight_layout()
    _save(fig, path)
    return fig


def default_show_layers(report: dict) -> list[int]:
    ks = [r["layer"] for r in report["layers"] if r["layer"] >= 1]
    return sorted({min(ks), report["bottleneck_layer"], max(ks)})


def plot_per_language(report: Mapping[str, Any], path: str) -> None:
    """Grouped bars (accuracy, TPR, FPR) per language; held-out languages hatched and shaded."""
    from matplotlib.patches import Patch

    langs = [l for l in report["per_language"] if l not in (ALL_SEEN, ALL_HELDOUT)]
    per = report["per_language"]
    fig = _new_figure(max(6.0, 0.9 * len(langs) + 2), 4.0, dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.26
    colors = {"accuracy": "tab:blue", "tpr": "tab:green", "fpr": "tab:red"}
    for j, metric in enumerate(("accuracy", "tpr", "fpr")):
        for i, lang in enumerate(langs):
            v = per[lang][metric]
            ax.bar(i + (j - 1) * width, 0.0 if v is None else v, width, color=colors[metric],
                   hatch=None if per[lang]["seen"] else "//", edgecolor="black", linewidth=0.4)
            if v is None:  # no harmful (TPR) or no benign (FPR) items: say so, not a zero bar
                ax.text(i + (j - 1) * width, 0.02, "n/a", rotation=90, ha="center", fontsize=7)
    for i, lang in enumerate(langs):
        if not per[lang]["seen"]:
            ax.axvspan(i - 0.5, i + 0.5, color="0.92", zorder=0)
    ax.set_xticks(range(len(langs)))
    ax.set_xticklabels([l if per[l]["seen"] else f"{l}\n(held-out)" for l in langs])
    ax.set_xlabel("language")
    ax.set_ylabel("rate (accuracy, TPR, FPR)")
    ax.set_ylim(0, 1.2)  # headroom so the legend sits above the bars
    ax.set_title(f"SSI at layer {report['layer']}, threshold {report['threshold']:.2f}")
    handles = [Patch(color=c, label=m.upper() if m != "accuracy" else "accuracy") for m, c in colors.items()]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="held-out language"))
    ax.legend(handles=handles, loc="upper center", fontsize=8, ncol=4)
    fig.tight_layout()
    _save(fig, path, dpi=120)


def plot_asr(report: Mapping[str, Any], path: str | os.PathLike):
    """Grouped bars: one group per language (and the average), one bar per model. Saves a PNG
    and returns the matplotlib Figure (not registered with pyplot, so nothing to close)."""
    groups = list(report["languages"]) + ["avg"]
    models = list(report["models"])
    width = 0.8 / max(len(models), 1)
    fig = _new_figure(max(6.0, 0.7 * len(groups) * max(len(models), 1)), 4.0, dpi=100)
    ax = fig.add_subplot()
    for j, model in enumerate(models):
        body = report["models"][model]
        vals = [body["per_language"][g]["asr"] for g in groups[:-1]] + [body["average"]["asr"]]
        heights = [math.nan if v is None else 100 * v for v in vals]
        xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(xs, heights, width=width, label=model)
        # Printed values tell a 0 % bar (invisible) from a missing one.
        ax.bar_label(bars, ["" if math.isnan(h) else f"{h:.1f}" for h in heights], fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_xlabel("Language")
    ax.set_ylabel("Attack success rate (%)")
    ax.set_title("ASR on harmful prompts per language")
    ax.set_ylim(0, 105)
    ax.legend(title="Model", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    _save(fig, path, dpi=120)
    return fig


# --------------------------------------------------------------------------------------------
