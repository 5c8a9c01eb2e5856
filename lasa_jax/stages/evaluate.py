"""Stage 4: SSI-gated generation on harmful and benign prompt sets, judging, the ASR report.

Inference (docs/LASA_METHOD.md, "Inference and evaluation"): the SSI reads the aligned model's
feature of the prompt at its layer; a flagged prompt gets the refusal prefix after the chat
template's generation prompt, exactly the text training conditioned on; then greedy decoding
(``lasa_jax.method.gate.respond``). The judge sees the generated text only, never the prefix.

Reads ``align/hf``, ``baseline/hf`` (if any), ``ssi/`` and ``config.data.eval_harmful`` /
``eval_benign``; writes ``WORKDIR/evaluate/``: ``generations.jsonl`` (written before judging, so
a run can be re-judged with ``rejudge``), ``judged.jsonl`` (generations + judgement fields),
``report.json`` (``lasa_jax.method.report.aggregate`` + ``config`` + ``judge`` +
``prompt_lengths``), ``asr.png``, ``eval_config.json``. They are written into
``WORKDIR/.evaluate.tmp-<pid>/`` and replace ``evaluate/`` only when complete; a failed run's
folder, with its generations.jsonl, stays until the next evaluation starts.
"""
from __future__ import annotations

import json
import logging
import os
import contextlib
from typing import Any

import jax

from lasa_jax.data import inputs
from lasa_jax.errors import ArtifactError, ConfigError
from lasa_jax.infra import fileio, multihost
from lasa_jax.infra.fileio import read_json, read_jsonl, write_json, write_jsonl
from lasa_jax.method import figures, judges
from lasa_jax.method import report as rep
from lasa_jax.method.gate import load_for_model, respond
from lasa_jax.model.generate import generate_text
from lasa_jax.model.lm import load_model
from lasa_jax.stages import align

log = logging.getLogger("lasa_jax")

GENERATIONS = "generations.jsonl"
JUDGED = "judged.jsonl"
REPORT = "report.json"
FIGURE = "asr.png"
EVAL_CONFIG = "eval_config.json"
GUARDS = ("qwen3guard", "llamaguard")
JUDGES = ("refusal", *GUARDS, "toyworld")


# ------------------------------------------------------------------------------ judging

def check_judge(name: str, guard_path: str = "", languages=(), language_check: bool = True) -> None:
    """Fail before any generation when the configured judge cannot be built or cannot judge one
    of the run's ``languages``."""
    if name not in JUDGES:
        raise ConfigError(f"config.evaluate.judge: unknown judge {name!r}; expected one of {', '.join(JUDGES)}")
    if name in GUARDS and not guard_path:
        raise ConfigError(f"config.evaluate.guard_path: judge {name!r} needs a local guard checkpoint")
    gaps = judges.coverage_gaps(name, languages, check_language=language_check)
    if gaps:
        why = "; ".join(f"{reason}: {codes}" for reason, codes in gaps.items())
        raise ConfigError(f"config.evaluate.judge: judge {name!r} cannot judge every language of "
                          f"config.data.languages ({why})")


def make_judge(name: str, *, guard_path: str = "", language_check: bool = True,
               batch_size: int = 16, guard_dtype: str = "bfloat16", mesh=None, model_path: str = ""):
    """The judge ``config.evaluate.judge`` names (the one factory). Guards are loaded from
    ``guard_path`` and decode greedily with ``generate_text`` on the guard's own chat-templated
    prompts; ``toyworld`` is the exact judge of the toy world whose checkpoint is ``model_path``
    (its ``toyworld.json``)."""
    check_judge(name, guard_path)
    invalid = judges.InvalidDetector(check_language=language_check)
    if name == "refusal":
        return judges.RefusalJudge(invalid=invalid)
    if name == "toyworld":
        from lasa_jax.toyworld.judge import ToyJudge
        return ToyJudge.for_checkpoint(model_path)
    # Only decoded from: keep just the decode layout (the FSDP-loaded copy is dropped here).
    guard = load_model(guard_path, dtype=guard_dtype, mesh=mesh).for_decoding()

    def generate_fn(texts: list[str], max_new_tokens: int) -> list[str]:
        # The judge applied the guard's chat template already (BOS included).
        return generate_text(guard, texts, add_special_tokens=False, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, progress=False)

    return judges.GuardJudge(kind=name, tokenizer=guard.tokenizer, generate_fn=generate_fn,
                             invalid=invalid, batch_size=batch_size * 8)


def judge_and_report(out_dir: str, records: list[dict[str, Any]], judge, *, judge_name: str,
                     config: dict | None = None, print_table: bool = True, extra: dict | None = None) -> dict:
    """Judge generation records, then write judged.jsonl, report.json and asr.png."""
    judged = judges.judge_records(judge, records)
    report = rep.aggregate(judged)
    report["judge"] = judge_name
    report.update(extra or {})
    if config is not None:
        report["config"] = config
    if multihost.is_primary():
        write_jsonl(os.path.join(out_dir, JUDGED), judged)
        write_json(os.path.join(out_dir, REPORT), report)
        figures.plot_asr(report, os.path.join(out_dir, FIGURE))
        if print_table:
            print(rep.markdown_table(report))
            print(rep.summary_table(report))
    return report


def rejudge(workdir: str, judge_name: str = "refusal", *, guard_path: str = "",
            language_check: bool = True, batch_size: int = 16, guard_dtype: str = "bfloat16",
            mesh=None, print_table: bool = True) -> dict:
    """Judge ``WORKDIR/evaluate/generations.jsonl`` again (no generation) with another judge or
    settings; overwrites judged.jsonl, report.json and asr.png."""
    out_dir = os.path.join(workdir, "evaluate")
    path = os.path.join(out_dir, GENERATIONS)
    if not fileio.exists(path):
        raise ArtifactError(f"{path}: no generations to re-judge; run the evaluate stage first")
    records = read_jsonl(path)
    config = None
    cfg_path = os.path.join(out_dir, EVAL_CONFIG)
    if fileio.exists(cfg_path):
        config = read_json(cfg_path, "evaluation config")
    model_path = ((config or {}).get("model") or {}).get("path") or ""
    judge = make_judge(judge_name, guard_path=guard_path, language_check=language_check,
                            batch_size=batch_size, guard_dtype=guard_dtype, mesh=mesh, model_path=model_path)
    return judge_and_report(out_dir, records, judge, judge_name=judge_name, config=config,
                            print_table=print_table)


# ------------------------------------------------------------------------------ stage

def _prompt_items(ctx) -> list[dict[str, str]]:
    """(prompt_set, qid, language, prompt) for the harmful and benign sets, the first
    ``max_prompts`` prompts per language and set (for a parallel file: the first queries, each in
    every configured language, so languages stay comparable)."""
    config = ctx.config
    items = []
    for prompt_set, field in (("harmful", "eval_harmful"), ("benign", "eval_benign")):
        taken: dict[str, int] = {}
        for p in inputs.eval_prompts(config, field):
            taken[p.language] = taken.get(p.language, 0) + 1
            if config.evaluate.max_prompts and taken[p.language] > config.evaluate.max_prompts:
                continue
            items.append({"prompt_set": prompt_set, "qid": p.qid, "language": p.language, "prompt": p.text})
    return items


def run(ctx) -> dict:
    """Models: ``aligned`` = WORKDIR/align/hf (SSI-gated when ``evaluate.use_ssi``), exported
    first from the final align checkpoint if only that exists; ``baseline`` = WORKDIR/baseline/hf
    (ungated) if the baseline stage ran; ``base`` when ``evaluate.compare_base``. No aligned model
    is an error, never a quieter base-only evaluation.

    Outputs are written into a fresh folder that replaces ``evaluate/`` only once complete, so a
    failed or interrupted evaluation leaves the previous one as it was."""
    c = ctx.config
    e = c.evaluate
    check_judge(e.judge, e.guard_path, ctx.languages, e.language_check)
    items = _prompt_items(ctx)
    models = []
    aligned_path = align.finished_export(ctx, "align")
    if aligned_path is None:
        raise ArtifactError(f"{os.path.join(ctx.workdir, 'align', 'hf')}: not found, and no align checkpoints; "
                            "run the align stage first (--config.stages=align,evaluate)")
    models.append(("aligned", aligned_path))
    # The baseline stage's model (plain KTO, no SSI/prefix) is evaluated ungated whenever it exists.
    baseline_path = align.finished_export(ctx, "baseline")
    if baseline_path is not None:
        models.append(("baseline", baseline_path))
    if e.compare_base:
        models.append(("base", None))
    files = {s: ctx.data_path(f"eval_{s}") for s in {it["prompt_set"] for it in items}}
    origins = {}
    for it in items:
        origins.setdefault(it["prompt"], (files[it["prompt_set"]], f"id {it['qid']} ({it['language']})"))

    key = jax.random.key(c.seed)
    records: list[dict[str, Any]] = []
    bounds = None
    for name, path in models:
        # Generation (and the SSI gate's features) run on the decode layout, resharded once per
        # model; a loaded model keeps only that copy, the base model keeps both (later stages).
        lm = (ctx.load(path, stage="generate") if path else ctx.base).for_decoding()
        if bounds is None:  # every model here shares the base model's context length
            bounds = {"generation": ctx.prompt_bound(lm, origins, reserve=e.max_new_tokens),
                      "ssi": ctx.prompt_bound(lm, origins)}
        artifact = None
        if name == "aligned" and e.use_ssi:
            ssi_dir = os.path.join(ctx.workdir, "ssi")
            if not multihost.on_primary(lambda: fileio.exists(os.path.join(ssi_dir, "ssi.json"))):
                raise ArtifactError(f"{ssi_dir}: no SSI artifact; run the ssi stage or set "
                                    "evaluate.use_ssi=False")
            artifact = load_for_model(lm, ssi_dir)
        log.info("evaluate: generating with the %s model (%d prompts%s)", name, len(items),
                 ", SSI-gated" if artifact is not None else "")
        got = respond(lm, [it["prompt"] for it in items], [it["language"] for it in items], artifact,
                      max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                      temperature=e.temperature, top_p=e.top_p, key=key, progress=c.progress,
                      bound=bounds["generation"], feature_bound=bounds["ssi"])
        for it, rec in zip(items, got):
            records.append({"model": name, "prompt_set": it["prompt_set"], "qid": it["qid"], **rec})
        if path:
            del lm  # free the aligned model before the next one is loaded

    config = json.loads(c.to_json_best_effort())
    judge = make_judge(e.judge, guard_path=e.guard_path, language_check=e.language_check,
                       batch_size=e.batch_size, guard_dtype=c.model.dtype,
                       mesh=ctx.mesh if e.judge in GUARDS else None, model_path=ctx.model_path)
    # Written into a staged folder that becomes evaluate/ (report.json last) only when complete.
    primary = multihost.is_primary()
    stage = fileio.staged_dir(ctx.workdir / "evaluate", REPORT) if primary else contextlib.nullcontext()
    with stage as staged:
        staging = staged.path if primary else os.fspath(ctx.workdir / "evaluate")
        if primary:
            write_jsonl(os.path.join(staging, GENERATIONS), records)
            write_json(os.path.join(staging, EVAL_CONFIG), config)
        report = judge_and_report(staging, records, judge, judge_name=e.judge, config=config,
                                  extra={"prompt_lengths": {k: b.report() for k, b in bounds.items()}})
    return report
