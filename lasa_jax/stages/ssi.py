"""Stage 2: train the SSI probe on the frozen base model's features at the bottleneck layer.

Reads ``bottleneck/report.json`` (unless ``config.ssi.layer`` is set) and the SSI prompts
(``config.data.ssi_prompts`` labelled, ``ssi_harmful`` and ``ssi_benign`` unlabelled; in the run's languages);
writes the artifact (``ssi/ssi.safetensors`` + ``ssi/ssi.json``), ``ssi/report.json`` and
``ssi/per_language.png``. Features are cached in ``WORKDIR/cache`` (``config.bottleneck.cache``).
"""
from __future__ import annotations

import json
import os

import numpy as np

from lasa_jax.data import inputs
from lasa_jax.data.languages import normalize_language
from lasa_jax.errors import ConfigError, UnknownLanguage
from lasa_jax.infra import multihost
from lasa_jax.infra.fileio import atomic_write_text
from lasa_jax.method import figures, probe
from lasa_jax.model.features import FEATURE_KINDS


def run(ctx) -> dict:
    c = ctx.config
    lm = ctx.base
    layer = ctx.bottleneck_layer(c.ssi.layer, "config.ssi.layer")
    lm.check_layers([layer], "config.ssi.layer")
    prompts = inputs.ssi_prompts(c)
    origins = {}
    for p in prompts:
        origins.setdefault(p.text, ("config.data.ssi_prompts/ssi_harmful/ssi_benign", f"idx {p.idx} ({p.language})"))
    feats, lengths = ctx.features(lm, [p.text for p in prompts], [layer], origins,
                                  batch_size=c.ssi.batch_size_features)
    feats = feats[0]
    labels = np.array([p.harmful for p in prompts], np.int32)
    langs = [p.language for p in prompts]
    settings = c.ssi.to_dict()
    settings["seed"] = c.seed if settings["seed"] == -1 else settings["seed"]
    try:  # "jw", "Javanese" and "jv" name one language, as in the data files
        settings["train_languages"] = tuple(normalize_language(x) for x in settings["train_languages"])
    except UnknownLanguage as e:
        raise ConfigError(f"config.ssi.train_languages: {e}") from None
    artifact, report = probe.train_ssi(feats, labels, langs, settings, meta={
        "layer": layer, "model_fingerprint": lm.fingerprint, "feature": FEATURE_KINDS[c.data.feature_text]})
    report["prompt_lengths"] = lengths
    if multihost.is_primary():
        out = ctx.stage_dir("ssi")
        probe.save_artifact(out, artifact.params, artifact.meta)
        atomic_write_text(os.path.join(out, "report.json"), json.dumps(report, indent=2))
        figures.plot_per_language(report, os.path.join(out, "per_language.png"))
        print(probe.format_table(report))
    return report
