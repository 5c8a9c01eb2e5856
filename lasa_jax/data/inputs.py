"""The run's inputs, one function per ``config.data`` field: what the stages read.

Each takes the run config and returns validated records; none needs a model, so a preflight can
call them all before any weights load (the same calls the stages make, so a file that passes the
preflight is read the same way later). Errors are ``DataError`` (file, record, field) or
``ConfigError`` (the field).
"""
from __future__ import annotations

from lasa_jax.data.languages import normalize_language
from lasa_jax.data.readers import (
    EvalPrompt,
    KTOExample,
    KTOPair,
    ParallelQuery,
    Prompt,
    read_eval_prompts,
    read_kto_pairs,
    read_parallel,
    read_prompts,
)
from lasa_jax.data.sources import Source, resolve
from lasa_jax.errors import ConfigError, UnknownLanguage

SSI_FIELDS = ("ssi_prompts", "ssi_harmful", "ssi_benign")
EVAL_FIELDS = ("eval_harmful", "eval_benign")


def languages_of(config) -> list[str]:
    """``config.data.languages`` as ISO codes (any ISO 639-1 language; duplicates are an error)."""
    try:
        codes = [normalize_language(x.strip()) for x in str(config.data.languages).split(",") if x.strip()]
    except UnknownLanguage as e:
        raise ConfigError(f"config.data.languages: {e}") from None
    if not codes:
        raise ConfigError("config.data.languages: empty")
    dup = sorted({c for c in codes if codes.count(c) > 1})
    if dup:
        raise ConfigError(f"config.data.languages: {dup} listed twice")
    return codes


def sources_of(config, name: str, languages=None) -> list[Source]:
    """The sources ``config.data.<name>`` names (errors name the field)."""
    return resolve(str(config.data[name]), languages=languages, model_path=str(config.model.path or ""),
                   field=f"config.data.{name}")


def parallel_prompts(config) -> list[ParallelQuery]:
    """``data.parallel_prompts`` in the run's languages (stage 1, and the alignment term)."""
    langs = languages_of(config)
    return read_parallel(sources_of(config, "parallel_prompts", langs), langs)


def ssi_prompts(config) -> list[Prompt]:
    """The SSI's training prompts (stage 2): ``data.ssi_prompts`` (labelled records), plus
    ``data.ssi_harmful`` and ``data.ssi_benign`` (every record harmful / benign), each a data
    path (comma-separated specs, globs, ``{lang}``); prompts in languages outside
    ``data.languages`` are left out. Both classes must be present."""
    langs = languages_of(config)
    prompts: list[Prompt] = []
    for name, harmful in zip(SSI_FIELDS, (None, True, False)):
        spec = str(config.data[name] or "")
        if spec.strip():
            prompts += read_prompts(sources_of(config, name, langs), harmful=harmful)
    if not any(str(config.data[n] or "").strip() for n in SSI_FIELDS):
        raise ConfigError("config.data.ssi_prompts: empty, and so are data.ssi_harmful and data.ssi_benign")
    kept = [p for p in prompts if p.language in langs]
    for label, word in ((True, "harmful"), (False, "benign")):
        if not any(p.harmful == label for p in kept):
            raise ConfigError(f"config.data.ssi_prompts/ssi_harmful/ssi_benign: no {word} prompt in the run's "
                              f"languages {langs}; the SSI needs both classes")
    return kept


def kto_data(config) -> list[KTOPair | KTOExample]:
    """``data.kto_pairs`` (stage 3): pairs and unpaired examples, in any format the reader takes."""
    return read_kto_pairs(sources_of(config, "kto_pairs", languages_of(config)))


def eval_prompts(config, name: str) -> list[EvalPrompt]:
    """``data.eval_harmful`` or ``data.eval_benign`` (stage 4) in the run's languages; an empty
    benign field gives no prompts."""
    if name not in EVAL_FIELDS:
        raise ValueError(f"eval_prompts: {name!r} is not one of {EVAL_FIELDS}")
    spec = str(config.data[name] or "")
    if not spec.strip():
        if name == "eval_harmful":
            raise ConfigError("config.data.eval_harmful: empty; the evaluation needs harmful prompts")
        return []
    langs = languages_of(config)
    return read_eval_prompts(sources_of(config, name, langs), langs)


def read_all(config) -> dict[str, list]:
    """Every configured input, read and validated (what a preflight calls)."""
    out = {"parallel_prompts": parallel_prompts(config), "ssi_prompts": ssi_prompts(config),
           "kto_pairs": kto_data(config)}
    for name in EVAL_FIELDS:
        out[name] = eval_prompts(config, name)
    return out


__all__ = ["EVAL_FIELDS", "SSI_FIELDS", "eval_prompts", "kto_data", "languages_of", "parallel_prompts",
           "read_all", "sources_of", "ssi_prompts"]
