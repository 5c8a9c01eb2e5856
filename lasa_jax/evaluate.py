"""Stage 4: SSI-gated generation on harmful and benign prompt sets, judging, ASR report.

Inference (LASA_METHOD.md, "Inference and evaluation"): the SSI reads the aligned model's
feature of the prompt at its layer; a flagged prompt gets the refusal prefix after the chat
template's generation prompt, exactly the text training conditioned on
(``kto_data.assistant_prefix_text``); then greedy decoding.

Decision: a record's ``response`` is what the model GENERATED, without the forced prefix, and
that is what the judge sees. The prefix is input, not output; the refusal-phrase lists contain
it (a reply that repeats it is a refusal), so judging prefix + continuation would make every
flagged prompt a refusal by construction and measure the SSI instead of the model.
``prefix_used`` records whether it was there.

Files in ``WORKDIR/evaluate/``: ``generations.jsonl`` (written before judging, so a run can be
re-judged with ``rejudge``), ``judged.jsonl`` (generations + judgement fields), ``report.json``
(``lasa_jax.report.aggregate`` + ``config`` + ``judge``), ``asr.png``, ``eval_config.json``.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import jax

from lasa_jax import report as rep
from lasa_jax.data.kto_data import REFUSAL_PREFIX, assistant_prefix_text
from lasa_jax.generate import generate
from lasa_jax.lm import LanguageModel
from lasa_jax.ssi import load_for_model as load_ssi_for, score_prompts

log = logging.getLogger("lasa_jax")

GENERATIONS = "generations.jsonl"
JUDGED = "judged.jsonl"
REPORT = "report.json"
FIGURE = "asr.png"
EVAL_CONFIG = "eval_config.json"


# ------------------------------------------------------------------------------ SSI-gated inference

def build_prompts(lm: LanguageModel, prompts: Sequence[str], flags: Sequence[bool]) -> list[list[int]]:
    """Token ids the model continues: chat template with generation prompt, plus the refusal
    prefix and its separator where flagged. Tokenised without added special tokens, since the
    template writes them (as in training's ``encode_item``)."""
    if len(prompts) != len(flags):
        raise ValueError(f"build_prompts: {len(prompts)} prompts but {len(flags)} flags")
    if lm.tokenizer is None:
        raise ValueError("build_prompts: this model was loaded without a tokenizer")
    texts = [assistant_prefix_text(lm.tokenizer, p, REFUSAL_PREFIX if f else None)
             for p, f in zip(prompts, flags)]
    return [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def respond(lm: LanguageModel, prompts: Sequence[str], languages: Sequence[str], artifact=None, *,
            max_new_tokens: int = 512, batch_size: int = 16, temperature: float = 0.0,
            top_p: float = 1.0, key: jax.Array | None = None, eos_ids: Sequence[int] | None = None,
            progress: bool = True) -> list[dict[str, Any]]:
    """One record per prompt: ``prompt, language, response, ssi_prob, ssi_flagged, prefix_used,
    n_new_tokens, stop`` ("eos" or "length"). Without an artifact the SSI fields are None and
    no prefix is used. ``response`` excludes the prefix (see the module docstring)."""
    if len(prompts) != len(languages):
        raise ValueError(f"respond: {len(prompts)} prompts but {len(languages)} languages")
    if artifact is not None:
        probs, flags = score_prompts(lm, artifact, prompts, batch_size, progress)
    else:
        probs, flags = [None] * len(prompts), [False] * len(prompts)
    from lasa_jax.generate import eos_ids_of
    eos = list(eos_ids_of(lm) if eos_ids is None else eos_ids)
    ids = generate(lm, build_prompts(lm, prompts, flags), max_new_tokens=max_new_tokens,
                   temperature=temperature, top_p=top_p, key=key, eos_ids=eos,
                   batch_size=batch_size, progress=progress)
    texts = lm.tokenizer.batch_decode(ids, skip_special_tokens=True)
    out = []
    for p, lang, prob, flag, new, text in zip(prompts, languages, probs, flags, ids, texts):
        out.append({
            "prompt": p, "language": lang, "response": text,
            "ssi_prob": None if prob is None else float(prob),
            "ssi_flagged": None if artifact is None else bool(flag),
            "prefix_used": bool(flag),
            "n_new_tokens": len(new),
            "stop": "eos" if new and new[-1] in eos else "length",
        })
    return out


# ------------------------------------------------------------------------------ judging

GUARDS = ("qwen3guard", "llamaguard")


def make_eval_judge(name: str, *, guard_path: str = "", language_check: bool = True,
                    batch_size: int = 16, guard_dtype: str = "bfloat16", mesh=None, model_path: str = ""):
    """The judge the config names. Guards are loaded from ``guard_path`` and decode greedily
    with ``generate_text`` on the guard's own chat-templated prompts; ``toyworld`` is the exact
    judge of the toy world whose checkpoint is ``model_path`` (its ``toyworld.json``)."""
    from lasa_jax import judges
    invalid = judges.InvalidDetector(check_language=language_check)
    if name == "refusal":
        return judges.RefusalJudge(invalid=invalid)
    if name == "toyworld":
        from lasa_jax.toyworld.judge import ToyJudge
        return ToyJudge.for_checkpoint(model_path)
    if name not in GUARDS:
        raise ValueError(f"config.evaluate.judge: unknown judge {name!r}; expected refusal, "
                         "qwen3guard, llamaguard or toyworld")
    if not guard_path:
        raise ValueError(f"config.evaluate.guard_path: judge {name!r} needs a local guard checkpoint")
    from lasa_jax.generate import generate_text
    from lasa_jax.lm import load_model
    guard = load_model(guard_path, dtype=guard_dtype, mesh=mesh)

    def generate_fn(texts: list[str], max_new_tokens: int) -> list[str]:
        # The judge applied the guard's chat template already (BOS included).
        return generate_text(guard, texts, add_special_tokens=False, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, progress=False)

    return judges.make_judge(name, tokenizer=guard.tokenizer, generate_fn=generate_fn,
                             invalid=invalid, batch_size=batch_size * 8)


def judge_and_report(out_dir: str, records: list[dict[str, Any]], judge, *, judge_name: str,
                     config: dict | None = None, print_table: bool = True) -> dict:
    """Judge generation records, then write judged.jsonl, report.json and asr.png."""
    from lasa_jax import distributed
    from lasa_jax.judges import judge_records
    judged = judge_records(judge, records)
    report = rep.aggregate(judged)
    report["judge"] = judge_name
    if config is not None:
        report["config"] = config
    if distributed.is_primary():
        rep.write_jsonl(os.path.join(out_dir, JUDGED), judged)
        rep.write_json(os.path.join(out_dir, REPORT), report)
        rep.plot_asr(report, os.path.join(out_dir, FIGURE))
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
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no generations to re-judge; run the evaluate stage first")
    records = rep.read_jsonl(path)
    config = None
    cfg_path = os.path.join(out_dir, EVAL_CONFIG)
    if os.path.exists(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            config = json.load(f)
    model_path = ((config or {}).get("model") or {}).get("path") or ""
    judge = make_eval_judge(judge_name, guard_path=guard_path, language_check=language_check,
                            batch_size=batch_size, guard_dtype=guard_dtype, mesh=mesh, model_path=model_path)
    return judge_and_report(out_dir, records, judge, judge_name=judge_name, config=config,
                            print_table=print_table)


# ------------------------------------------------------------------------------ stage

def _prompt_items(config) -> list[dict[str, str]]:
    """(prompt_set, qid, language, prompt) for the harmful and benign sets, ``max_prompts``
    queries per set (each in every configured language, so languages stay comparable)."""
    from lasa_jax.data.readers import read_parallel
    from lasa_jax.pipeline import languages_of, resolve_data_path
    langs = languages_of(config)
    items = []
    for prompt_set, field in (("harmful", "eval_harmful"), ("benign", "eval_benign")):
        value = config.data[field]
        if not value:
            if prompt_set == "harmful":
                raise ValueError("config.data.eval_harmful: empty; the evaluation needs harmful prompts")
            continue
        queries = read_parallel(resolve_data_path(value, config.model.path), langs)
        if config.evaluate.max_prompts:
            queries = queries[:config.evaluate.max_prompts]
        for q in queries:
            for lang, text in q.texts.items():
                items.append({"prompt_set": prompt_set, "qid": q.qid, "language": lang, "prompt": text})
    return items


def run_evaluate(run) -> dict:
    """Stage 4. Models: ``aligned`` = WORKDIR/align/hf (SSI-gated when ``evaluate.use_ssi``)
    if it exists; ``base`` (plain, the baseline) when ``evaluate.compare_base`` or when there is
    no aligned model."""
    from lasa_jax import distributed
    c = run.config
    e = c.evaluate
    out_dir = run.stage_dir("evaluate")
    items = _prompt_items(c)
    aligned_path = os.path.join(run.workdir, "align", "hf")
    have_aligned = os.path.exists(os.path.join(aligned_path, "config.json"))
    models = []
    if have_aligned:
        models.append(("aligned", aligned_path))
    else:
        log.warning("evaluate: %s not found; evaluating the base model only", aligned_path)
    # The baseline stage's model (plain KTO, no SSI/prefix) is evaluated ungated whenever it exists.
    baseline_path = os.path.join(run.workdir, "baseline", "hf")
    if os.path.exists(os.path.join(baseline_path, "config.json")):
        models.append(("baseline", baseline_path))
    if e.compare_base or not have_aligned:
        models.append(("base", None))

    key = jax.random.key(c.seed)
    records: list[dict[str, Any]] = []
    for name, path in models:
        lm = run.load(path, stage="generate") if path else run.base
        artifact = None
        if name == "aligned" and e.use_ssi:
            ssi_dir = os.path.join(run.workdir, "ssi")
            if not os.path.exists(os.path.join(ssi_dir, "ssi.json")):
                raise FileNotFoundError(f"{ssi_dir}: no SSI artifact; run the ssi stage or set "
                                        "evaluate.use_ssi=False")
            artifact = load_ssi_for(lm, ssi_dir)
        log.info("evaluate: generating with the %s model (%d prompts%s)", name, len(items),
                 ", SSI-gated" if artifact is not None else "")
        got = respond(lm, [it["prompt"] for it in items], [it["language"] for it in items], artifact,
                      max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                      temperature=e.temperature, top_p=e.top_p, key=key, progress=c.progress)
        for it, rec in zip(items, got):
            records.append({"model": name, "prompt_set": it["prompt_set"], "qid": it["qid"], **rec})
        if path:
            del lm  # free the aligned model before the next one is loaded

    config = json.loads(c.to_json_best_effort())
    if distributed.is_primary():
        rep.write_jsonl(os.path.join(out_dir, GENERATIONS), records)
        rep.write_json(os.path.join(out_dir, EVAL_CONFIG), config)
    judge = make_eval_judge(e.judge, guard_path=e.guard_path, language_check=e.language_check,
                            batch_size=e.batch_size, guard_dtype=c.model.dtype,
                            mesh=run.mesh if e.judge in GUARDS else None, model_path=run.model_path)
    return judge_and_report(out_dir, records, judge, judge_name=e.judge, config=config)
