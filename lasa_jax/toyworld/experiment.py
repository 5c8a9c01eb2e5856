"""Base vs baseline vs LASA on a toy checkpoint: the toy config's pipeline run, condensed.

    python -m lasa_jax.toyworld.experiment [--model DIR] [--workdir runs/toy_experiment] [--seed 0] [--feature-text raw]

Runs `toy_config` (the same run as configs/toy.py) on the given checkpoint: bottleneck, SSI on
the high tier at k*, Latent KTO (align.z_mode = "source", safety items conditioned with
probability 0.5), the baseline (the same KTO pairs, optimiser and steps with z = 0 for every
item, so no refusal prefix anywhere, evaluated without the SSI) and the SSI-gated evaluation,
every generation judged exactly by the world's judge (evaluate.judge = "toyworld"). Condenses
the stage reports into WORKDIR/toy_report.json: the layer-wise S_sem - S_lang curve, the SSI's
per-language accuracy and the per-language rates of base / baseline / LASA.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from lasa_jax.method import report as rep
from lasa_jax.infra.fileio import atomic_write_text
from lasa_jax.toyworld.config import TOY_MODEL, toy_config

# Name in this report -> model name in the evaluate stage's report.
MODELS = {"base": "base", "baseline": "baseline", "lasa": "aligned"}


def _read(workdir: str, stage: str) -> dict:
    with open(os.path.join(workdir, stage, "report.json"), encoding="utf-8") as f:
        return json.load(f)


def run_experiment(model: str = TOY_MODEL, workdir: str = "runs/toy_experiment", *, seed: int = 0,
                   progress: bool = False, feature_text: str = "raw") -> dict:
    """`feature_text` is config.data.feature_text: "raw" (the specification's prompt feature, the
    toy config's) or "chat" (read at the end of the chat-templated prompt), for every stage."""
    from lasa_jax import runner
    c = toy_config(model, workdir)
    c.seed, c.progress, c.data.feature_text = seed, progress, feature_text
    t0 = time.time()
    runner.run(c)
    with open(os.path.join(model, "toyworld.json"), encoding="utf-8") as f:
        info = json.load(f)
    bn, ssi, ev = (_read(workdir, s) for s in ("bottleneck", "ssi", "evaluate"))
    report = {
        "model": os.path.abspath(model), "world_seed": int(info["seed"]),
        "world_version": int(info.get("world_version", 1)), "run_seed": seed, "feature_text": feature_text,
        "bottleneck": {"layer": bn["bottleneck_layer"], "num_layers": bn["num_layers"],
                       "relative_depth": bn["relative_depth"],
                       "curve": [{"layer": r["layer"], "s_sem": r["s_sem"], "s_lang": r["s_lang"],
                                  "diff": r["diff"]} for r in bn["layers"]]},
        "ssi": {"layer": ssi["layer"], "threshold": ssi["threshold"],
                "per_language": {k: {m: v.get(m) for m in ("accuracy", "tpr", "fpr", "seen")}
                                 for k, v in ssi["per_language"].items()}},
        # The evaluate report's layout ({"languages", "models": {name: {"per_language", "average"}}})
        # under this report's model names.
        "evaluation": {"languages": ev["languages"],
                       "models": {name: ev["models"][src] for name, src in MODELS.items()}},
        "seconds": round(time.time() - t0, 1),
    }
    atomic_write_text(os.path.join(workdir, "toy_report.json"), json.dumps(report, indent=1))
    return report


def format_report(report: dict) -> str:
    bn = report["bottleneck"]
    lines = [f"Bottleneck k* = {bn['layer']} of {bn['num_layers']} (relative depth {bn['relative_depth']:.2f})", "",
             "| layer | " + " | ".join(str(r["layer"]) for r in bn["curve"]) + " |",
             "|---|" + "---|" * len(bn["curve"])]
    for key, label in (("diff", "S_sem - S_lang"), ("s_sem", "S_sem"), ("s_lang", "S_lang")):
        lines.append(f"| {label} | " + " | ".join(f"{r[key]:.3f}" for r in bn["curve"]) + " |")
    ssi = report["ssi"]["per_language"]
    acc = ", ".join(f"{c} {100 * v['accuracy']:.0f}" for c, v in ssi.items() if v.get("accuracy") is not None)
    lines += ["", rep.summary_table(report["evaluation"]),
              f"SSI at layer {report['ssi']['layer']}, threshold {report['ssi']['threshold']:.2f}: accuracy (%) {acc}"]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="base vs baseline vs LASA on the toy world")
    p.add_argument("--model", default=TOY_MODEL)
    p.add_argument("--workdir", default="runs/toy_experiment")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--feature-text", default="raw", choices=("raw", "chat"))
    a = p.parse_args(argv)
    report = run_experiment(a.model, a.workdir, seed=a.seed, progress=True, feature_text=a.feature_text)
    print(format_report(report))
    print(f"\n{a.workdir}/toy_report.json; {report['seconds']} s")


if __name__ == "__main__":
    main()
