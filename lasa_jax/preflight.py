"""The preflight: every input of a run checked before any stage runs, on every process.

A bad value found after hours of compute costs those hours, and a stage that fails half-way may
already have overwritten what an earlier run left. So ``check(ctx, stages)``, called by the runner
before the first stage, reads everything a run will need and stops at the first problem with one
line naming the field or file (a ``LasaError``):

* every config field against its rule (``FIELD_RULES``: type, range or choice; every field of
  ``config.base_config()`` has one, a test checks it), then the rules that tie fields together
  (mesh, batch sizes, lengths, layers);
* the model: ``config.json`` (architecture, ``model_type``, ``model.expect``), the safetensors
  headers against it, the tokenizer; for the tiny default, that an existing ``tiny_model`` was
  built from ``model.tiny.*``;
* every data file the stages read, through the same readers the stages use;
* the judge and its guard checkpoint;
* the workdir: writable, on this process;
* what a stage needs from an earlier one: there (and readable, and from this model), or produced
  by an earlier stage of this run.

Nothing here writes anything but a probe file in the workdir (removed at once).
"""
from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable
from typing import Any

import jax

from lasa_jax.config import ARCH_FACTS, STAGES
from lasa_jax.context import languages_of
from lasa_jax.data.languages import normalize_language
from lasa_jax.data import inputs
from lasa_jax.errors import ArtifactError, CheckpointError, ConfigError, UnknownLanguage, WorkdirError
from lasa_jax.infra import fileio, multihost
from lasa_jax.infra.fileio import read_json
from lasa_jax.infra.mesh import resolve_mesh_shape
from lasa_jax.method.kto_data import Z_MODES
from lasa_jax.method.probe import CRITERIA, load_artifact
from lasa_jax.model.checkpoint import check_checkpoint
from lasa_jax.model.config import ARCHITECTURES, ModelConfig, check_expected, from_hf_config
from lasa_jax.model.features import FEATURE_KINDS
from lasa_jax.model.lm import DTYPES, load_tokenizer, model_fingerprint
from lasa_jax.model.tiny import check_tiny_checkpoint, tiny_model_config
from lasa_jax.model.transformer import REMAT_POLICIES
from lasa_jax.stages import align
from lasa_jax.stages.evaluate import GUARDS, JUDGES, check_judge

Rule = Callable[[Any], "str | None"]  # value -> what is wrong with it, None if nothing


# ============================================================================ field rules

def _int(lo: int | None = None, hi: int | None = None, also: tuple[int, ...] = ()) -> Rule:
    def rule(v):
        if isinstance(v, bool) or not isinstance(v, int):
            return f"expected an integer, got {type(v).__name__}"
        if v in also:
            return None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            return f"expected an integer {rng}" + (f" (or {', '.join(map(str, also))})" if also else "")
        return None
    return rule


def _float(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False) -> Rule:
    def rule(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"expected a number, got {type(v).__name__}"
        if not math.isfinite(v) or v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi):
            return f"expected a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open or hi == math.inf else ']'}"
        return None
    return rule


def _choice(*values) -> Rule:
    def rule(v):
        return None if v in values else f"expected one of {list(values)}"
    return rule


def _bool(v):
    return None if isinstance(v, bool) else f"expected true or false, got {type(v).__name__}"


def _text(v):
    return None if isinstance(v, str) else f"expected a string, got {type(v).__name__}"


def _nonempty(v):
    return _text(v) or (None if v.strip() else "must not be empty")


def _optional(kind: type) -> Rule:
    """``model.expect.*``: None (not checked) or a value of the fact's type."""
    def rule(v):
        if v is None:
            return None
        if kind is int:
            return _int(1)(v)
        if kind is bool:
            return _bool(v)
        return None if v in ARCHITECTURES.values() else f"expected one of {sorted(ARCHITECTURES.values())}"
    return rule


def _language_list(v):
    if not isinstance(v, (tuple, list)) or not v or not all(isinstance(x, str) for x in v):
        return "expected a non-empty list of language names or codes"
    return None


def _checked_elsewhere(v):
    """Fields a dedicated parser checks in full (``check``)."""
    return None


_SIZE = _int(1)
_FAMILY = _choice(*ARCHITECTURES.values())
_DTYPE = _choice(*DTYPES)

FIELD_RULES: dict[str, Rule] = {
    "workdir": _nonempty, "seed": _int(0), "stages": _checked_elsewhere, "progress": _bool,
    "device_memory_gb": _float(0.0),
    # model
    "model.path": _text, "model.require_path": _bool, "model.paper_bottleneck": _int(0, also=(-1,)),
    "model.dtype": _DTYPE, "model.param_dtype": _DTYPE, "model.remat": _choice(*REMAT_POLICIES),
    "model.attention_impl": _choice("", "xla", "cudnn"), "model.enable_thinking": _bool,
    **{f"model.expect.{name}": _optional(kind) for name, kind in ARCH_FACTS.items()},
    "model.tiny.family": _FAMILY, "model.tiny.hidden_size": _SIZE, "model.tiny.num_layers": _SIZE,
    "model.tiny.num_heads": _SIZE, "model.tiny.num_kv_heads": _SIZE, "model.tiny.intermediate_size": _SIZE,
    # devices
    "mesh.data": _int(1, also=(-1,)), "mesh.fsdp": _int(1, also=(-1,)), "mesh.tensor": _int(1, also=(-1,)),
    "distributed.initialize": _choice(*multihost.MODES), "distributed.coordinator_address": _text,
    "distributed.num_processes": _int(0), "distributed.process_id": _int(0, also=(-1,)),
    "distributed.local_device_ids": _checked_elsewhere,
    # data (paths are read below, through the readers)
    "data.parallel_prompts": _text, "data.ssi_prompts": _text, "data.ssi_harmful": _text,
    "data.ssi_benign": _text, "data.kto_pairs": _text,
    "data.eval_harmful": _text, "data.eval_benign": _text, "data.languages": _checked_elsewhere,
    "data.feature_text": _choice(*FEATURE_KINDS), "data.max_prompt_tokens": _int(0),
    # stage 1
    "bottleneck.batch_size": _SIZE, "bottleneck.bootstrap_draws": _int(0),
    "bottleneck.ci": _float(0.0, 1.0, lo_open=True, hi_open=True), "bottleneck.cache": _bool,
    "bottleneck.max_queries": _int(0),
    # stage 2
    "ssi.hidden": _int(1, also=(-1,)), "ssi.dropout": _float(0.0, 1.0, hi_open=True),
    "ssi.learning_rate": _float(0.0, lo_open=True), "ssi.weight_decay": _float(0.0),
    "ssi.batch_size": _SIZE, "ssi.max_epochs": _SIZE, "ssi.grad_clip": _float(0.0, lo_open=True),
    "ssi.lr_patience": _SIZE, "ssi.lr_factor": _float(0.0, 1.0, lo_open=True),
    "ssi.early_stop_patience": _SIZE, "ssi.val_fraction": _float(0.0, 1.0, lo_open=True, hi_open=True),
    "ssi.train_languages": _language_list, "ssi.criterion": _choice(*CRITERIA),
    "ssi.max_fpr": _float(0.0, 1.0, lo_open=True, hi_open=True), "ssi.seed": _int(0, also=(-1,)),
    "ssi.layer": _int(0, also=(-1,)), "ssi.batch_size_features": _SIZE,
    # stage 3
    "align.beta": _float(0.0, lo_open=True), "align.desirable_weight": _float(0.0, lo_open=True),
    "align.undesirable_weight": _float(0.0, lo_open=True), "align.z_mode": _choice(*Z_MODES),
    "align.source_probs": _checked_elsewhere, "align.lambda_align": _float(0.0),
    "align.align_layer": _int(0, also=(-1,)), "align.align_batch_queries": _SIZE,
    "align.reference": _choice("precomputed", "per_step"), "align.step_shapes": _SIZE,
    "align.learning_rate": _float(0.0, lo_open=True),
    "align.warmup_steps": _int(0), "align.weight_decay": _float(0.0), "align.grad_clip": _float(0.0, lo_open=True),
    "align.batch_size": _int(2), "align.grad_accum": _SIZE, "align.epochs": _SIZE, "align.max_steps": _int(0),
    "align.max_length": _int(2), "align.max_prompt_length": _SIZE, "align.checkpoint_every": _SIZE,
    "align.keep_checkpoints": _SIZE, "align.export": _bool, "align.export_dtype": _choice("", *DTYPES),
    "align.master_dtype": _choice(*DTYPES),
    "align.async_checkpoints": _bool, "align.tensorboard": _bool,
    # stage 4
    "evaluate.judge": _choice(*JUDGES), "evaluate.guard_path": _text, "evaluate.max_new_tokens": _SIZE,
    "evaluate.batch_size": _SIZE, "evaluate.temperature": _float(0.0), "evaluate.top_p": _float(0.0, 1.0),
    "evaluate.use_ssi": _bool, "evaluate.compare_base": _bool, "evaluate.language_check": _bool,
    "evaluate.max_prompts": _int(0),
}


def leaves(config, prefix: str = "") -> dict[str, Any]:
    """Dotted field name -> value for every leaf of a (nested) ConfigDict."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items") and not isinstance(value, dict):
            out.update(leaves(value, name + "."))
        else:
            out[name] = value
    return out


def check_fields(config) -> None:
    """Every field against its rule in ``FIELD_RULES``."""
    for name, value in leaves(config).items():
        rule = FIELD_RULES.get(name)
        problem = rule(value) if rule is not None else "no rule for this field (lasa_jax.preflight.FIELD_RULES)"
        if problem:
            raise ConfigError(f"config.{name}={value!r}: {problem}")


# ============================================================================ the run's inputs

def _needs(stages: list[str], name: str, before: str) -> bool:
    """Whether stage ``name`` runs in this run before stage ``before``."""
    return name in stages and STAGES.index(name) < STAGES.index(before)


def _check_relations(c, stages: list[str]) -> None:
    if not stages:
        raise ConfigError("config.stages: empty; name one or more of " + ",".join(STAGES))
    languages = languages_of(c)
    if not languages:
        raise ConfigError("config.data.languages: empty")
    if len(set(languages)) != len(languages):
        raise ConfigError(f"config.data.languages={c.data.languages!r}: a language is listed twice")
    for name in c.ssi.train_languages:
        _language(name, "config.ssi.train_languages")
    try:
        multihost.initialize_kwargs(c.distributed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    resolve_mesh_shape(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, jax.device_count())
    a = c.align
    if a.batch_size % a.grad_accum:
        raise ConfigError(f"config.align.batch_size={a.batch_size} is not divisible by "
                          f"config.align.grad_accum={a.grad_accum}")
    if a.max_prompt_length >= a.max_length:
        raise ConfigError(f"config.align.max_prompt_length={a.max_prompt_length} leaves no room for a reply "
                          f"within config.align.max_length={a.max_length}")
    align.parse_source_probs(a.source_probs)
    if c.evaluate.judge in GUARDS and not c.evaluate.guard_path:
        raise ConfigError(f"config.evaluate.guard_path: judge {c.evaluate.judge!r} needs a local guard checkpoint")
    if c.model.require_path and not c.model.path:
        raise ConfigError("config.model.path is empty: this config needs a local checkpoint "
                          "directory, e.g. --config.model.path=/ckpt/Llama-3.1-8B-Instruct")


def _language(name: str, field: str) -> str:
    try:
        return normalize_language(name)
    except UnknownLanguage as e:
        raise ConfigError(f"{field}: {e}") from None


def _check_writable(ctx, stages: list[str]) -> None:
    """The workdir and the folders this run will write, by writing a probe file in each."""
    workdir = fileio.as_path(ctx.workdir)  # a local folder or a URL
    folders = [workdir] + [workdir / s for s in (*stages, "cache") if (workdir / s).is_dir()]
    for folder in folders:
        probe = folder / f".lasa-write-probe-{socket.gethostname()}-{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_text("probe\n")
            probe.unlink()
        except OSError as e:
            raise WorkdirError(f"{folder}: not writable ({e.strerror or e})") from None


def _check_model_dir(path: str, field: str, expect: dict | None = None):
    """(ModelConfig, tokenizer) of a local checkpoint directory, headers and tokenizer checked."""
    if not fileio.as_path(path).is_dir():
        raise ConfigError(f"{field}={path!r}: not a directory")
    cfg = from_hf_config(path)
    if expect:
        check_expected(cfg, expect, os.path.join(path, "config.json"))
    check_checkpoint(path, cfg)
    return cfg, load_tokenizer(path)


def _model(ctx):
    """(ModelConfig, tokenizer) of the base model, or of the tiny one this run will build."""
    m = ctx.config.model
    if m.path:
        expect = {k: v for k, v in m.expect.to_dict().items() if v is not None}
        return _check_model_dir(m.path, "config.model.path", expect)
    t = m.tiny.to_dict()
    if t["hidden_size"] % t["num_heads"] or t["num_heads"] % t["num_kv_heads"]:
        raise ConfigError(f"config.model.tiny: hidden_size={t['hidden_size']}, num_heads={t['num_heads']} and "
                          f"num_kv_heads={t['num_kv_heads']} must divide each other")
    directory = os.path.join(ctx.workdir, "tiny_model")
    if check_tiny_checkpoint(directory, seed=ctx.config.seed, **t):
        return _check_model_dir(directory, "tiny_model")
    from lasa_jax.model.tokenizers import build_byte_tokenizer
    tok = build_byte_tokenizer("llama3" if t["family"] == "llama" else "qwen")
    sizes = {k: v for k, v in t.items() if k != "family"}
    return tiny_model_config(t["family"], len(tok), **sizes), tok


def _check_lengths(c, cfg: ModelConfig, stages: list[str]) -> None:
    ctx_len = cfg.max_position_embeddings
    if {"align", "baseline"} & set(stages) and c.align.max_length > ctx_len:
        raise ConfigError(f"config.align.max_length={c.align.max_length} exceeds the model's "
                          f"max_position_embeddings={ctx_len}")
    if "evaluate" in stages and c.evaluate.max_new_tokens >= ctx_len:
        raise ConfigError(f"config.evaluate.max_new_tokens={c.evaluate.max_new_tokens} leaves no room for a "
                          f"prompt in the model's max_position_embeddings={ctx_len}")


def _layer(ctx, field: str, value: int, cfg: ModelConfig, fingerprint: str, stages: list[str],
           stage: str) -> None:
    """A layer field: in range for this model; -1 needs k* from this run or bottleneck/report.json."""
    L = cfg.num_layers
    if value > L:
        raise ConfigError(f"{field}={value}: out of range; this model has layers 0..{L} "
                          "(0 = embeddings, k = after block k; -1 = the bottleneck layer)")
    if value == -1 and not _needs(stages, "bottleneck", stage):
        k = ctx.bottleneck_layer(-1, field)
        path = os.path.join(ctx.workdir, "bottleneck", "report.json")
        found = read_json(path, "bottleneck report").get("model_fingerprint")
        if found not in (None, fingerprint):
            raise ArtifactError(f"{path}: computed for another model (fingerprint {found!r}, this model "
                                f"{fingerprint!r}); rerun the bottleneck stage or set {field}")
        if not 0 <= k <= L:
            raise ArtifactError(f"{os.path.join(ctx.workdir, 'bottleneck', 'report.json')}: bottleneck_layer={k} "
                                f"is out of range 0..{L} for this model; rerun the bottleneck stage")


def _check_data(ctx, stages: list[str]) -> None:
    """Every data file the stages will read, parsed through the same loaders the stages use."""
    c = ctx.config
    langs = ctx.languages
    if "bottleneck" in stages or ({"align", "baseline"} & set(stages) and c.align.lambda_align > 0):
        queries = inputs.parallel_prompts(c)
        if len(queries) < 2 or len(langs) < 2:
            raise ConfigError(f"config.data.parallel_prompts: the bottleneck needs >= 2 queries in >= 2 languages "
                              f"(got {len(queries)} in {len(langs)})")
    if "ssi" in stages:
        prompts = inputs.ssi_prompts(c)
        for name in c.ssi.train_languages:
            lang = _language(name, "config.ssi.train_languages")
            labels = {p.harmful for p in prompts if p.language == lang}
            if labels != {True, False}:
                raise ConfigError(f"config.ssi.train_languages: {lang!r} needs harmful and benign prompts in "
                                  f"config.data.ssi_prompts/ssi_harmful/ssi_benign (found "
                                  f"{len([p for p in prompts if p.language == lang])} prompts, labels {sorted(labels)})")
    if {"align", "baseline"} & set(stages):
        pairs = inputs.kto_data(c)
        for stage in {"align", "baseline"} & set(stages):
            a = c.align if stage == "align" else align.baseline_align_config(c.align)
            if a.z_mode != "ssi":  # a source without a probability, a missing label
                align.make_items(pairs, a, seed=c.seed)
    if "evaluate" in stages:
        for field in ("eval_harmful", "eval_benign"):
            inputs.eval_prompts(c, field)


def _check_ssi_artifact(ctx, cfg: ModelConfig, tokenizer) -> None:
    ssi_dir = os.path.join(ctx.workdir, "ssi")
    if not fileio.exists(os.path.join(ssi_dir, "ssi.json")):
        raise ArtifactError(f"{ssi_dir}: no SSI artifact; run the ssi stage first")
    load_artifact(ssi_dir, model_fingerprint=model_fingerprint(cfg, tokenizer), hidden_size=cfg.hidden_size,
                  num_layers=cfg.num_layers)


def _check_artifacts(ctx, stages: list[str], cfg: ModelConfig, tokenizer) -> None:
    """What each stage needs from an earlier one: produced earlier in this run, or there."""
    c = ctx.config
    fingerprint = model_fingerprint(cfg, tokenizer)
    if "ssi" in stages:
        _layer(ctx, "config.ssi.layer", c.ssi.layer, cfg, fingerprint, stages, "ssi")
    for stage in ("align", "baseline"):
        if stage in stages and c.align.lambda_align > 0:
            _layer(ctx, "config.align.align_layer", c.align.align_layer, cfg, fingerprint, stages, stage)
    if "align" in stages and c.align.z_mode == "ssi" and not _needs(stages, "ssi", "align"):
        _check_ssi_artifact(ctx, cfg, tokenizer)
    if "evaluate" in stages:
        if c.evaluate.use_ssi and not _needs(stages, "ssi", "evaluate"):
            _check_ssi_artifact(ctx, cfg, tokenizer)
        if not _needs(stages, "align", "evaluate") and align.export_status(ctx, "align") is None:
            raise ArtifactError(f"{os.path.join(ctx.workdir, 'align', 'hf')}: not found, and no align checkpoints; "
                                "run the align stage first (--config.stages=align,evaluate)")
        if not _needs(stages, "baseline", "evaluate"):
            align.export_status(ctx, "baseline")  # an unfinished baseline is an error, not a skipped model


def _check_judge(ctx, stages: list[str]) -> None:
    e = ctx.config.evaluate
    if "evaluate" not in stages:
        return
    check_judge(e.judge, e.guard_path, ctx.languages, e.language_check)
    if e.judge in GUARDS:
        cfg, tok = _check_model_dir(e.guard_path, "config.evaluate.guard_path")
        if not getattr(tok, "chat_template", None):
            raise CheckpointError(f"{e.guard_path}: the guard's tokenizer has no chat_template")
    if e.judge == "toyworld":
        path = os.path.join(ctx.config.model.path or ".", "toyworld.json")
        if not fileio.exists(path):
            raise ConfigError(f"config.evaluate.judge='toyworld' needs a toy-world checkpoint in config.model.path "
                              f"({path} not found)")
        info = read_json(path, "toy-world build record")
        if not isinstance(info, dict) or not isinstance(info.get("seed"), int):
            raise ArtifactError(f"{path}: not a toy-world build record (no integer 'seed')")


def check(ctx, stages: list[str]) -> None:
    """Everything above, in the order a user would fix it: fields, workdir, model, data,
    artifacts, judge. Raises the first problem as a one-line ``LasaError``."""
    c = ctx.config
    check_fields(c)
    _check_relations(c, stages)
    _check_writable(ctx, stages)
    cfg, tokenizer = _model(ctx)
    _check_lengths(c, cfg, stages)
    _check_data(ctx, stages)
    _check_artifacts(ctx, stages, cfg, tokenizer)
    _check_judge(ctx, stages)

