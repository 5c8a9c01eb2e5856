"""Stage 1: features of the parallel prompts at every layer -> silhouettes -> the bottleneck k*.

Reads ``config.data.parallel_prompts`` (``lasa_jax.data.inputs``); writes ``bottleneck/report.json`` (k*, one entry per
layer with ``s_sem``, ``s_lang``, ``diff``, the bootstrap CI and cosine gaps),
``silhouette.png`` and ``projection.png``. Features are cached in ``WORKDIR/cache``.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import numpy as np

from lasa_jax.data import inputs
from lasa_jax.infra import multihost
from lasa_jax.infra.fileio import atomic_write_text
from lasa_jax.method import figures, silhouette

log = logging.getLogger("lasa_jax")


def run(ctx) -> dict:
    c = ctx.config
    queries = inputs.parallel_prompts(c)
    if c.bottleneck.max_queries:
        queries = queries[:c.bottleneck.max_queries]
    texts, qids, langs, origins = [], [], [], {}
    for q in queries:
        for lang, text in q.texts.items():
            texts.append(text), qids.append(q.qid), langs.append(lang)
            origins.setdefault(text, (c.data.parallel_prompts, f"id {q.qid} ({lang})"))
    lm = ctx.base
    layers = list(range(lm.cfg.num_layers + 1))
    feats, lengths = ctx.features(lm, texts, layers, origins, batch_size=c.bottleneck.batch_size,
                                  extra_key={"max_queries": c.bottleneck.max_queries})
    report = silhouette.analyse(feats, layers, qids, langs, bootstrap_draws=c.bottleneck.bootstrap_draws,
                                ci=c.bottleneck.ci, seed=c.seed, num_layers=lm.cfg.num_layers)
    if multihost.is_primary():
        write_outputs(ctx.stage_dir("bottleneck"), report, feats, layers, qids, langs, extra={
            "config": json.loads(c.to_json_best_effort()), "model_fingerprint": lm.fingerprint,
            "model_path": lm.path, "prompt_file": c.data.parallel_prompts, "prompt_lengths": lengths,
            "paper_bottleneck_layer": c.model.paper_bottleneck if c.model.paper_bottleneck >= 0 else None})
        print(silhouette.format_table(report))
    log.info("bottleneck layer %d of %d", report["bottleneck_layer"], lm.cfg.num_layers)
    if lengths["truncated"]:
        log.warning("bottleneck: %d prompt(s) longer than %d tokens were cut from the left (report.json: "
                    "prompt_lengths)", lengths["truncated"], lengths["limit"])
    return report


def _json_default(obj):
    if isinstance(obj, np.generic) and np.ndim(obj) == 0:
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"report.json: value of type {type(obj).__name__} is not JSON-serialisable")


def write_outputs(outdir, report, features, layers, query_ids, languages, extra: dict | None = None,
                  *, show_layers: Sequence[int] | None = None) -> dict[str, str]:
    """Write report.json (report + extra), silhouette.png, projection.png into outdir."""
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(report))
    if clash:
        raise ValueError(f"extra: keys {clash} would overwrite report fields")
    outdir = os.fspath(outdir)
    paths = {
        "report": os.path.join(outdir, "report.json"),
        "silhouette": os.path.join(outdir, "silhouette.png"),
        "projection": os.path.join(outdir, "projection.png"),
    }
    text = json.dumps({**report, **extra}, indent=2, allow_nan=False, default=_json_default)
    atomic_write_text(paths["report"], text + "\n")
    figures.plot_silhouette(report, paths["silhouette"])
    if show_layers is None:
        show_layers = figures.default_show_layers(report)
    figures.plot_projection(features, layers, query_ids, languages, list(show_layers), paths["projection"])
    return paths
