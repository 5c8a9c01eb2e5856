"""Base vs baseline vs LASA on a toy checkpoint, judged exactly.

    python -m lasa_jax.toyworld.experiment [--model DIR] [--workdir runs/toy_experiment]

Three models, one evaluation set (the checkpoint's data/eval_*.csv, every language):
- base:     the toy checkpoint as built (pretrained + SFT that refuses only in the high tier);
- baseline: stage 3 on the same KTO pairs (high tier only) with z = 0 for every item
            (align.source_probs = "safety=0,general=0", so no refusal prefix anywhere), evaluated
            without the SSI (evaluate.use_ssi = False). The same data, optimiser and steps as
            LASA; only the SSI/prefix mechanism is missing;
- LASA:     the four stages unchanged: bottleneck, SSI trained on the high tier at k*, Latent KTO
            (align.z_mode = "source", safety items conditioned with probability 0.5), SSI-gated
            evaluation.
Generations come from the pipeline's own evaluate stage (evaluate/generations.jsonl); the toy
judge re-reads them. Output: WORKDIR/toy_report.json and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from lasa_jax.toyworld import world
from lasa_jax.toyworld.config import TOY_MODEL, toy_config
from lasa_jax.toyworld.judge import ToyJudge, summarize

MODELS = ("base", "baseline", "lasa")


def _stage(name: str):
    """The registered stage function; while stages.py still lacks a mapping, the stage's own
    module (the same function the registry will point to)."""
    from lasa_jax import stages
    fn = stages.STAGES[name]
    if "_missing" in getattr(fn, "__qualname__", ""):
        if name == "align":
            from lasa_jax.train import run_align as fn
        elif name == "evaluate":
            from lasa_jax.evaluate import run_evaluate as fn
    return fn


def run_stages(config) -> dict[str, float]:
    from lasa_jax import pipeline
    from lasa_jax.config import stages_of
    run = pipeline.Run(config)
    os.makedirs(run.workdir, exist_ok=True)
    seconds = {}
    for name in stages_of(config):
        t0 = time.time()
        _stage(name)(run)
        seconds[name] = round(time.time() - t0, 1)
    return seconds


def lasa_config(model: str, workdir: str, seed: int, progress: bool = False):
    c = toy_config(model, os.path.join(workdir, "lasa"))
    c.seed, c.progress = seed, progress
    c.evaluate.compare_base = True
    return c


def baseline_config(model: str, workdir: str, seed: int, progress: bool = False):
    c = toy_config(model, os.path.join(workdir, "baseline"))
    c.seed, c.progress = seed, progress
    c.stages = "align,evaluate"
    c.align.z_mode = "source"
    c.align.source_probs = "safety=0.0,general=0.0"
    c.evaluate.use_ssi = False
    c.evaluate.compare_base = False
    return c


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def judge_generations(path: str, world_seed: int, world_version: int = 1) -> dict[str, dict]:
    """model name in the file -> per-language summary (see judge.summarize)."""
    judge = ToyJudge(world_seed, world_version)
    by_model: dict[str, list] = {}
    for rec in _read_jsonl(path):
        by_model.setdefault(rec["model"], []).append(judge.judge(rec["prompt"], rec["response"]))
    return {m: summarize(js) for m, js in by_model.items()}


def run_experiment(model: str = TOY_MODEL, workdir: str = "runs/toy_experiment", *, seed: int = 0,
                   progress: bool = False) -> dict:
    with open(os.path.join(model, "toyworld.json")) as f:
        info = json.load(f)
    # Checkpoints built before v2 carry no version: they are v1.
    world_seed, world_version = int(info["seed"]), int(info.get("world_version", 1))
    t0 = time.time()
    seconds = {"lasa": run_stages(lasa_config(model, workdir, seed, progress)),
               "baseline": run_stages(baseline_config(model, workdir, seed, progress))}
    lasa = judge_generations(os.path.join(workdir, "lasa", "evaluate", "generations.jsonl"), world_seed, world_version)
    base = judge_generations(os.path.join(workdir, "baseline", "evaluate", "generations.jsonl"), world_seed, world_version)
    with open(os.path.join(workdir, "lasa", "bottleneck", "report.json")) as f:
        bn = json.load(f)
    with open(os.path.join(workdir, "lasa", "ssi", "report.json")) as f:
        ssi = json.load(f)
    report = {
        "model": os.path.abspath(model), "world_seed": world_seed, "world_version": world_version, "run_seed": seed,
        "bottleneck": {"layer": bn["bottleneck_layer"], "num_layers": bn["num_layers"],
                       "relative_depth": bn["relative_depth"],
                       "curve": [{"layer": r["layer"], "s_sem": r["s_sem"], "s_lang": r["s_lang"],
                                  "diff": r["diff"]} for r in bn["layers"]]},
        "ssi": {"layer": ssi["layer"], "threshold": ssi["threshold"],
                "per_language": {k: {m: v.get(m) for m in ("accuracy", "tpr", "fpr", "seen")}
                                 for k, v in ssi["per_language"].items()}},
        "per_language": {"base": lasa["base"], "baseline": base["aligned"], "lasa": lasa["aligned"]},
        "seconds": {**seconds, "total": round(time.time() - t0, 1)},
    }
    with open(os.path.join(workdir, "toy_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def _pct(v):
    return "-" if v is None else f"{100 * v:.0f}"


def tier_mean(per_language: dict, metric: str, tier: str) -> float | None:
    vals = [per_language[c][metric] for c in world.TIERS[tier] if c in per_language and per_language[c][metric] is not None]
    return sum(vals) / len(vals) if vals else None


def format_report(report: dict) -> str:
    langs = [c for c in world.LANGUAGES if c in report["per_language"]["base"]]
    bn = report["bottleneck"]
    lines = [f"Bottleneck k* = {bn['layer']} of {bn['num_layers']} (relative depth {bn['relative_depth']:.2f})", "",
             "| layer | " + " | ".join(str(r["layer"]) for r in bn["curve"]) + " |",
             "|---|" + "---|" * len(bn["curve"]),
             "| S_sem - S_lang | " + " | ".join(f"{r['diff']:.3f}" for r in bn["curve"]) + " |",
             "| S_sem | " + " | ".join(f"{r['s_sem']:.3f}" for r in bn["curve"]) + " |",
             "| S_lang | " + " | ".join(f"{r['s_lang']:.3f}" for r in bn["curve"]) + " |", ""]
    tiers = ("high", "mid", "low")
    header = "| metric (%) | model | " + " | ".join(langs) + " | " + " | ".join(tiers) + " |"
    lines += [header, "|---|---|" + "---|" * (len(langs) + len(tiers))]
    for metric, label in (("asr", "ASR"), ("benign_refusal_rate", "benign refused"),
                          ("harmful_invalid_rate", "harmful invalid")):
        for m in MODELS:
            per = report["per_language"][m]
            lines.append(f"| {label} | {m} | " + " | ".join(_pct(per[c][metric]) for c in langs) + " | "
                         + " | ".join(_pct(tier_mean(per, metric, t)) for t in tiers) + " |")
    ssi = report["ssi"]["per_language"]
    lines += ["", f"SSI at layer {report['ssi']['layer']}, threshold {report['ssi']['threshold']:.2f}: accuracy per language "
              + ", ".join(f"{c} {_pct(ssi[c]['accuracy'])}" for c in langs if c in ssi)]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="base vs baseline vs LASA on the toy world")
    p.add_argument("--model", default=TOY_MODEL)
    p.add_argument("--workdir", default="runs/toy_experiment")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    report = run_experiment(a.model, a.workdir, seed=a.seed, progress=True)
    print(format_report(report))
    print(f"\n{a.workdir}/toy_report.json; seconds: {report['seconds']}")


if __name__ == "__main__":
    main()
