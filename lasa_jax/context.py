"""What every stage needs from a run: the config, the mesh, the (lazily loaded, releasable) base
model, resolved data paths, and the artifacts earlier stages left in the workdir.

Stages talk only through files in the workdir (``bottleneck/report.json``, ``ssi/``, ``align/``,
``evaluate/``), so each can be rerun alone; this module is where those paths are named. The
workdir is an ``epath.Path``: a local folder (made absolute once) or a ``gs://`` URL kept as
given. What the context decides from the workdir's contents (the bottleneck layer, whether the
tiny model must be built) is decided on process 0 and shared (``lasa_jax.infra.multihost``).
"""
from __future__ import annotations

import logging
import os

import numpy as np

from lasa_jax.data import inputs
from lasa_jax.data.sources import local_path
from lasa_jax.errors import ArtifactError, ConfigError, DataError
from lasa_jax.infra import fileio, fitcheck, multihost
from lasa_jax.infra.fileio import cached_array, digest, read_json
from lasa_jax.infra.mesh import mesh_from_config
from lasa_jax.model.checkpoint import weights_digest
from lasa_jax.model.config import from_hf_config
from lasa_jax.model.features import extract_features
from lasa_jax.model.lengths import PromptBound, limit_for
from lasa_jax.model.lm import LanguageModel, load_model
from lasa_jax.model.tiny import make_tiny_checkpoint

log = logging.getLogger("lasa_jax")


def resolve_data_path(path: str, model_path: str = "", field: str = "config.data") -> str:
    """One data file, local or a URL: ``fixtures:NAME`` names a file shipped in
    lasa_jax/data/fixtures, ``model:NAME`` a file inside the model directory
    (``config.model.path``: data that travels with its checkpoint, as the toy world's does);
    anything else is a path. The stages read their inputs through ``lasa_jax.data.inputs``,
    which takes every data-path form."""
    path = local_path(path, model_path, field)
    if not fileio.exists(path):
        raise DataError(path, None, field, "data file not found")
    return path


languages_of = inputs.languages_of  # ``config.data.languages`` as ISO codes


class Context:
    """The run's config, mesh and base model, and the workdir's artifact paths."""

    def __init__(self, config):
        self.config = config
        fileio.check_url(config.workdir, "config.workdir")
        self.workdir = fileio.as_path(config.workdir)
        self._model_path: str | None = None
        self._mesh = None
        self._base: LanguageModel | None = None

    # ------------------------------------------------------------------ paths
    def stage_dir(self, name: str):
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def data_path(self, field: str) -> str:
        """The resolved path of ``config.data.<field>``."""
        return resolve_data_path(self.config.data[field], self.config.model.path, f"config.data.{field}")

    @property
    def languages(self) -> list[str]:
        return languages_of(self.config)

    @property
    def cache_dir(self):
        return self.workdir / "cache"

    def feature_cache_key(self, lm: LanguageModel, texts, layers) -> dict:
        """Everything a cached feature array depends on: weights, the prompt texts (in order; read
        from any number of files or datasets), layers, the feature convention, the chat
        template's settings and the prompt length limit."""
        return {"model_fingerprint": lm.fingerprint, "weights": weights_digest(lm.path),
                "prompts": digest(list(texts)), "languages": self.languages,
                "layers": list(layers), "enable_thinking": bool(self.config.model.enable_thinking),
                "feature_text": self.config.data.feature_text, "dtype": str(np.dtype(lm.dtype)),
                "prompt_limit": self.prompt_bound(lm).limit}
    def prompt_bound(self, lm: LanguageModel, origins=None, *, reserve: int = 0, limit: int = 0) -> PromptBound:
        """The length bound of a tokenising path: the model's context less ``reserve`` (a reply's
        new tokens), and at most ``config.data.max_prompt_tokens`` and the path's own ``limit``
        (each when > 0). ``origins``: prompt text -> (file, record), for reports and errors."""
        configured = [int(x) for x in (self.config.data.max_prompt_tokens, limit) if int(x) > 0]
        return PromptBound(limit_for(lm.cfg.max_position_embeddings, min(configured, default=0), reserve),
                           origins)

    def features(self, lm: LanguageModel, texts, layers, origins, *, batch_size: int,
                 extra_key: dict | None = None) -> tuple[np.ndarray, dict]:
        """(features, prompt-length report) of ``texts``, through the feature cache when
        ``config.bottleneck.cache``. ``origins``: prompt text -> (file, record)."""
        c = self.config
        bound = self.prompt_bound(lm, origins)
        chat = c.data.feature_text == "chat"
        key = {**self.feature_cache_key(lm, texts, layers), **(extra_key or {})}
        computed = []

        def compute():
            computed.append(True)
            return extract_features(lm, texts, layers, batch_size=batch_size, chat_template=chat,
                                    bound=bound, progress=c.progress)

        feats = cached_array(self.cache_dir if c.bottleneck.cache else None, key, compute)
        if not computed:  # read from the cache: count the cut prompts all the same (tokens only)
            lm.token_ids(texts, chat_template=chat, bound=bound)
        return feats, bound.report()

    def bottleneck_layer(self, override: int, field: str) -> int:
        """``override`` when it is >= 0 (checked against the model by the caller), else k* from
        ``bottleneck/report.json`` (read on process 0, the same layer for every process)."""
        if override >= 0:
            return int(override)
        if override != -1:
            raise ConfigError(f"{field}={override}: expected a layer index >= 0, or -1 for the bottleneck layer")
        path = os.path.join(self.workdir, "bottleneck", "report.json")

        def read() -> int:
            if not fileio.exists(path):
                raise ArtifactError(f"{path}: not found; run the bottleneck stage first or set {field}")
            report = read_json(path, "bottleneck report")
            if not isinstance(report, dict) or not isinstance(report.get("bottleneck_layer"), int):
                raise ArtifactError(f"{path}: no integer field 'bottleneck_layer'; rerun the bottleneck stage")
            return report["bottleneck_layer"]
        return multihost.on_primary(read)

    # ------------------------------------------------------------------ model
    @property
    def mesh(self):
        if self._mesh is None:
            self._mesh = mesh_from_config(self.config.mesh)
        return self._mesh

    @property
    def model_path(self) -> str:
        """``config.model.path`` (a local or mounted folder, or a URL), or the tiny random
        checkpoint built in the workdir by process 0 (the others wait until it is written)."""
        if self._model_path is None:
            self._model_path = self._resolve_model_path()
        return self._model_path

    def _resolve_model_path(self) -> str:
        m = self.config.model
        if m.path:
            fileio.check_url(m.path, "config.model.path")
            if not multihost.on_primary(lambda: fileio.as_path(m.path).is_dir()):
                raise ConfigError(f"config.model.path={m.path!r}: not a directory")
            return m.path
        if m.require_path:
            raise ConfigError("config.model.path is empty: this config needs a checkpoint "
                              "directory, e.g. --config.model.path=/ckpt/Llama-3.1-8B-Instruct")
        path = os.fspath(self.workdir / "tiny_model")
        multihost.on_primary(lambda: make_tiny_checkpoint(path, seed=self.config.seed, **m.tiny.to_dict()))
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
                          expect=expect, remat=m.remat, attention_impl=m.attention_impl or None,
                          chat_template_kwargs={"enable_thinking": bool(m.enable_thinking)})

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
