"""What every stage needs from a run: the config, the mesh, the (lazily loaded, releasable) base
model, resolved data paths, and the artifacts earlier stages left in the workdir.

Stages talk only through files in the workdir (``bottleneck/report.json``, ``ssi/``, ``align/``,
``evaluate/``), so each can be rerun alone; this module is where those paths are named.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from lasa_jax.data.languages import normalize_language
from lasa_jax.data.readers import FIXTURES_DIR
from lasa_jax.errors import ArtifactError, ConfigError, DataError, UnknownLanguage
from lasa_jax.infra import fitcheck, multihost
from lasa_jax.infra.fileio import file_hash, read_json
from lasa_jax.infra.mesh import mesh_from_config
from lasa_jax.model.checkpoint import weights_digest
from lasa_jax.model.config import from_hf_config
from lasa_jax.model.lm import LanguageModel, load_model
from lasa_jax.model.tiny import make_tiny_checkpoint

log = logging.getLogger("lasa_jax")

FIXTURE_PREFIX = "fixtures:"
MODEL_PREFIX = "model:"


def resolve_data_path(path: str, model_path: str = "", field: str = "config.data") -> str:
    """``fixtures:NAME`` names a file shipped in lasa_jax/data/fixtures, ``model:NAME`` a file
    inside the model directory (``config.model.path``: data that travels with its checkpoint, as
    the toy world's does); anything else is a path."""
    if path.startswith(FIXTURE_PREFIX):
        path = os.path.join(FIXTURES_DIR, path[len(FIXTURE_PREFIX):])
    elif path.startswith(MODEL_PREFIX):
        if not model_path:
            raise ConfigError(f"{field}: {path!r} is relative to config.model.path, which is empty")
        path = os.path.join(model_path, path[len(MODEL_PREFIX):])
    if not os.path.exists(path):
        raise DataError(path, None, field, "data file not found")
    return path


def languages_of(config) -> list[str]:
    """``config.data.languages`` as ISO codes."""
    try:
        return [normalize_language(x.strip()) for x in str(config.data.languages).split(",") if x.strip()]
    except UnknownLanguage as e:
        raise ConfigError(f"config.data.languages: {e}") from None


class Context:
    """The run's config, mesh and base model, and the workdir's artifact paths."""

    def __init__(self, config):
        self.config = config
        self.workdir = os.path.abspath(config.workdir)
        self._mesh = None
        self._base: LanguageModel | None = None

    # ------------------------------------------------------------------ paths
    def stage_dir(self, name: str) -> str:
        path = os.path.join(self.workdir, name)
        os.makedirs(path, exist_ok=True)
        return path

    def data_path(self, field: str) -> str:
        """The resolved path of ``config.data.<field>``."""
        return resolve_data_path(self.config.data[field], self.config.model.path, f"config.data.{field}")

    @property
    def languages(self) -> list[str]:
        return languages_of(self.config)

    @property
    def cache_dir(self) -> str:
        return os.path.join(self.workdir, "cache")

    def feature_cache_key(self, lm: LanguageModel, prompt_file: str, layers) -> dict:
        """Everything a cached feature array depends on: weights, prompt file, languages read from
        it, layers and the feature convention."""
        return {"model_fingerprint": lm.fingerprint, "weights": weights_digest(lm.path),
                "prompts": file_hash(prompt_file), "languages": self.languages, "layers": list(layers),
                "feature_text": self.config.data.feature_text, "dtype": str(np.dtype(lm.dtype))}

    def bottleneck_layer(self, override: int, field: str) -> int:
        """``override`` when it is >= 0 (checked against the model by the caller), else k* from
        ``bottleneck/report.json``."""
        if override >= 0:
            return int(override)
        if override != -1:
            raise ConfigError(f"{field}={override}: expected a layer index >= 0, or -1 for the bottleneck layer")
        path = os.path.join(self.workdir, "bottleneck", "report.json")
        if not os.path.exists(path):
            raise ArtifactError(f"{path}: not found; run the bottleneck stage first or set {field}")
        report = read_json(path, "bottleneck report")
        if not isinstance(report, dict) or not isinstance(report.get("bottleneck_layer"), int):
            raise ArtifactError(f"{path}: no integer field 'bottleneck_layer'; rerun the bottleneck stage")
        return report["bottleneck_layer"]

    # ------------------------------------------------------------------ model
    @property
    def mesh(self):
        if self._mesh is None:
            self._mesh = mesh_from_config(self.config.mesh)
        return self._mesh

    @property
    def model_path(self) -> str:
        m = self.config.model
        if m.path:
            if not os.path.isdir(m.path):
                raise ConfigError(f"config.model.path={m.path!r}: not a directory")
            return m.path
        if m.require_path:
            raise ConfigError("config.model.path is empty: this config needs a local checkpoint "
                              "directory, e.g. --config.model.path=/ckpt/Llama-3.1-8B-Instruct")
        path = os.path.join(self.workdir, "tiny_model")
        if multihost.is_primary():
            make_tiny_checkpoint(path, seed=self.config.seed, **m.tiny.to_dict())
        return path

    def load(self, path: str | None = None, stage: str = "features") -> LanguageModel:
        """Load ``path`` (default: the base model) onto the mesh, after checking that ``stage``
        fits in device memory."""
        m = self.config.model
        path = path or self.model_path
        cfg = from_hf_config(path)
        device_bytes = fitcheck.device_memory_bytes() or (self.config.device_memory_gb * 2**30 or None)
        if device_bytes:
            est = fitcheck.estimate(cfg, stage=stage, mesh_shape=dict(self.mesh.shape),
                                    param_dtype=m.param_dtype, compute_dtype=m.dtype,
                                    batch_size=self._batch_for(stage), seq_len=self._seq_for(stage),
                                    remat=m.remat, reference=self.config.align.reference,
                                    master_dtype=self.config.align.master_dtype,
                                    grad_accum=self.config.align.grad_accum if stage == "align" else 1)
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
    def base(self) -> LanguageModel:
        """The base model for the feature stages, loaded once and kept until ``release_base``."""
        if self._base is None:
            self._base = self.load()
        return self._base

    def release_base(self) -> None:
        """Drop the base model so that its device buffers can be freed before a stage loads its
        own copy (align trains one, evaluate loads the aligned one). Its parameters are dropped
        from the model object itself, so a reference to it left anywhere keeps no weights alive."""
        if self._base is not None:
            self._base.params = None
        self._base = None
