"""The stages as functions of the run config; ``main.py`` calls ``run``.

Stages talk only through files in the workdir (``bottleneck/report.json``, ``ssi/``, ``align/``,
``evaluate/``), so each can be rerun alone. This module is glue: the mechanisms live in
``bottleneck``, ``ssi``, ``kto``/``train``, ``generate`` and ``judges``.
"""
from __future__ import annotations

import json
import logging
import os
import time

import numpy as np

from lasa_jax import distributed
from lasa_jax.atomic import atomic_write_text
from lasa_jax.config import stages_of

log = logging.getLogger("lasa_jax")
FIXTURE_PREFIX = "fixtures:"
MODEL_PREFIX = "model:"


def resolve_data_path(path: str, model_path: str = "") -> str:
    """``fixtures:NAME`` names a file shipped in lasa_jax/data/fixtures, ``model:NAME`` a file
    inside the model directory (``config.model.path``: data that travels with its checkpoint, as
    the toy world's does); anything else is a path."""
    if path.startswith(FIXTURE_PREFIX):
        from lasa_jax.data.readers import FIXTURES_DIR
        path = os.path.join(FIXTURES_DIR, path[len(FIXTURE_PREFIX):])
    elif path.startswith(MODEL_PREFIX):
        if not model_path:
            raise ValueError(f"config.data: {path!r} is relative to config.model.path, which is empty")
        path = os.path.join(model_path, path[len(MODEL_PREFIX):])
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: data file not found")
    return path


def languages_of(config) -> list[str]:
    from lasa_jax.data.languages import normalize_language
    return [normalize_language(x.strip()) for x in str(config.data.languages).split(",") if x.strip()]


class Run:
    """What every stage needs: the config, the mesh and (lazily) the base model."""

    def __init__(self, config):
        self.config = config
        self.workdir = os.path.abspath(config.workdir)
        self._mesh = None
        self._base = None

    def stage_dir(self, name: str) -> str:
        path = os.path.join(self.workdir, name)
        os.makedirs(path, exist_ok=True)
        return path

    @property
    def mesh(self):
        if self._mesh is None:
            from lasa_jax.sharding import mesh_from_config
            self._mesh = mesh_from_config(self.config.mesh)
        return self._mesh

    @property
    def model_path(self) -> str:
        m = self.config.model
        if m.path:
            if not os.path.isdir(m.path):
                raise FileNotFoundError(f"config.model.path={m.path!r}: not a directory")
            return m.path
        if m.require_path:
            raise ValueError("config.model.path is empty: this config needs a local checkpoint "
                             "directory, e.g. --config.model.path=/ckpt/Llama-3.1-8B-Instruct")
        from lasa_jax.tiny import make_tiny_checkpoint
        path = os.path.join(self.workdir, "tiny_model")
        if distributed.is_primary():
            make_tiny_checkpoint(path, seed=self.config.seed, **m.tiny.to_dict())
        return path

    def load(self, path: str | None = None, stage: str = "features"):
        from lasa_jax.lm import load_model
        from lasa_jax import fitcheck
        from lasa_jax.models.config import from_hf_config
        m = self.config.model
        path = path or self.model_path
        cfg = from_hf_config(path)
        device_bytes = fitcheck.device_memory_bytes() or (self.config.device_memory_gb * 2**30 or None)
        if device_bytes:
            est = fitcheck.estimate(cfg, stage=stage, mesh_shape=dict(self.mesh.shape),
                                    param_dtype=m.param_dtype, compute_dtype=m.dtype,
                                    batch_size=self._batch_for(stage), seq_len=self._seq_for(stage),
                                    remat=m.remat, reference=self.config.align.reference)
            fitcheck.check_fit(est, device_bytes)
        expect = {k: v for k, v in m.expect.to_dict().items() if v is not None}
        return load_model(path, dtype=m.dtype, param_dtype=m.param_dtype, mesh=self.mesh,
                          expect=expect, remat=m.remat, attention_impl=m.attention_impl or None)

    def _batch_for(self, stage):
        c = self.config
        return {"align": c.align.batch_size, "generate": c.evaluate.batch_size}.get(stage, c.bottleneck.batch_size)

    def _seq_for(self, stage):
        c = self.config
        return {"align": c.align.max_length,
                "generate": c.align.max_prompt_length + c.evaluate.max_new_tokens}.get(stage, 256)

    @property
    def base(self):
        if self._base is None:
            self._base = self.load()
        return self._base


def feature_cache_key(lm, prompt_file: str, layers, feature_text: str) -> dict:
    from lasa_jax.features import file_hash
    from lasa_jax.models.checkpoint import weights_digest
    return {"model_fingerprint": lm.fingerprint, "weights": weights_digest(lm.path),
            "prompts": file_hash(prompt_file), "layers": list(layers), "feature_text": feature_text,
            "dtype": str(np.dtype(lm.dtype))}


def run_bottleneck(run: Run) -> dict:
    """Stage 1: features of parallel prompts at every layer -> silhouettes -> k*."""
    from lasa_jax import bottleneck
    from lasa_jax.data.readers import read_parallel
    from lasa_jax.features import cached_features, extract_features
    c = run.config
    path = resolve_data_path(c.data.parallel_prompts, c.model.path)
    queries = read_parallel(path, languages_of(c))
    if c.bottleneck.max_queries:
        queries = queries[:c.bottleneck.max_queries]
    texts, qids, langs = [], [], []
    for q in queries:
        for lang, text in q.texts.items():
            texts.append(text), qids.append(q.qid), langs.append(lang)
    lm = run.base
    layers = list(range(lm.cfg.num_layers + 1))
    chat = c.data.feature_text == "chat"
    out = run.stage_dir("bottleneck")
    key = {**feature_cache_key(lm, path, layers, c.data.feature_text), "max_queries": c.bottleneck.max_queries}
    feats = cached_features(os.path.join(run.workdir, "cache") if c.bottleneck.cache else None, key,
                            lambda: extract_features(lm, texts, layers, batch_size=c.bottleneck.batch_size,
                                                     chat_template=chat, progress=c.progress))
    report = bottleneck.analyse(feats, layers, qids, langs, bootstrap_draws=c.bottleneck.bootstrap_draws,
                                ci=c.bottleneck.ci, seed=c.seed, num_layers=lm.cfg.num_layers)
    if distributed.is_primary():
        bottleneck.write_outputs(out, report, feats, layers, qids, langs, extra={
            "config": json.loads(c.to_json_best_effort()), "model_fingerprint": lm.fingerprint,
            "model_path": lm.path, "prompt_file": path,
            "paper_bottleneck_layer": c.model.paper_bottleneck if c.model.paper_bottleneck >= 0 else None})
        print(bottleneck.format_table(report))
    log.info("bottleneck layer %d of %d", report["bottleneck_layer"], lm.cfg.num_layers)
    return report


def bottleneck_layer(run: Run, override: int) -> int:
    if override >= 0:
        return int(override)
    path = os.path.join(run.workdir, "bottleneck", "report.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found; run the bottleneck stage first or set the layer explicitly")
    with open(path) as f:
        return int(json.load(f)["bottleneck_layer"])


def run_ssi(run: Run) -> dict:
    """Stage 2: train the probe on the frozen model's features at the bottleneck layer."""
    from lasa_jax import ssi
    from lasa_jax.data.readers import read_prompts
    from lasa_jax.features import FEATURE_CONVENTIONS, cached_features, extract_features
    c = run.config
    lm = run.base
    layer = bottleneck_layer(run, c.ssi.layer)
    lm.check_layers([layer])
    path = resolve_data_path(c.data.ssi_prompts, c.model.path)
    prompts = read_prompts(path)
    chat = c.data.feature_text == "chat"
    key = feature_cache_key(lm, path, [layer], c.data.feature_text)
    feats = cached_features(os.path.join(run.workdir, "cache"), key,
                            lambda: extract_features(lm, [p.text for p in prompts], [layer],
                                                     batch_size=c.ssi.batch_size_features,
                                                     chat_template=chat, progress=c.progress))[0]
    labels = np.array([p.harmful for p in prompts], np.int32)
    langs = [p.language for p in prompts]
    artifact, report = ssi.train_ssi(feats, labels, langs, c.ssi, meta={
        "layer": layer, "model_fingerprint": lm.fingerprint, "feature": FEATURE_CONVENTIONS[chat]})
    out = run.stage_dir("ssi")
    if distributed.is_primary():
        ssi.save_artifact(out, artifact.params, artifact.meta)
        atomic_write_text(os.path.join(out, "report.json"), json.dumps(report, indent=2))
        ssi.plot_per_language(report, os.path.join(out, "per_language.png"))
        print(ssi.format_table(report))
    return report


def run(config) -> None:
    """Run ``config.stages`` in order."""
    distributed.maybe_initialize(config.distributed)
    stages = stages_of(config)
    run = Run(config)
    os.makedirs(run.workdir, exist_ok=True)
    from lasa_jax import stages as registry
    for name in stages:
        t0 = time.time()
        log.info("stage %s: start", name)
        registry.STAGES[name](run)
        log.info("stage %s: done in %.1fs", name, time.time() - t0)
