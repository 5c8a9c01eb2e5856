"""The toy world end to end for several seeds: world + checkpoint + the four stages + the baseline.

    PYTHONPATH=. python bench/toyworld.py [--seeds 0,1,2] [--root runs/bench_toyworld] [--rebuild] [--no-sweep]
        [--world-version 3] [--feature-text raw|chat]

For each seed s: build the world and checkpoint from seed s (skipped when
ROOT/seed{s}/model exists, unless --rebuild), then run lasa_jax.toyworld.experiment with run
seed s, then (unless --no-sweep) the SSI stage alone at every layer as a diagnostic. Prints, per
seed, the layer-wise S_sem - S_lang curve, the bottleneck's relative depth, the per-language
rates of base / baseline / LASA and the SSI sweep; then tier means across seeds. Writes
ROOT/summary.json. On 2 shared CPU cores one seed takes roughly 5-10 minutes (build 4-7, stages 1-2).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from lasa_jax.method import report as rep
from lasa_jax.toyworld import experiment, world
from lasa_jax.toyworld.build import BuildConfig, build


TIERS = tuple(world.TIERS)


def ssi_layer_sweep(model: str, root: str, seed: int, feature_text: str = "raw") -> list[dict]:
    """A diagnostic beside LASA, not part of it: the SSI stage at every layer k >= 1 (trained on
    the high tier as in the run), to tell "the bottleneck criterion picked a poor layer" from "no
    layer holds a harmfulness signal that carries across languages". Per layer: validation
    accuracy on the seen languages, accuracy and ROC-AUC on the held-out ones. `feature_text`
    "chat" reads features at the end of the chat-templated prompt instead of the raw one (the
    specification's and the run's choice)."""
    from lasa_jax import runner
    from lasa_jax.model.config import from_hf_config
    from lasa_jax.toyworld.config import toy_config
    rows = []
    for k in range(1, from_hf_config(model).num_layers + 1):
        c = toy_config(model, os.path.join(root, f"ssi_{feature_text}_layer{k}"))
        c.seed, c.progress, c.stages, c.ssi.layer, c.data.feature_text = seed, False, "ssi", k, feature_text
        runner.run(c)
        with open(os.path.join(c.workdir, "ssi", "report.json")) as f:
            per = json.load(f)["per_language"]
        rows.append({"layer": k, "seen_accuracy": per["all_seen"]["accuracy"],
                     "heldout_accuracy": per["all_heldout"]["accuracy"], "heldout_auc": per["all_heldout"]["roc_auc"]})
    return rows


def format_sweep(rows: list[dict]) -> str:
    lines = ["| SSI at layer | " + " | ".join(str(r["layer"]) for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for key, label in (("seen_accuracy", "seen acc."), ("heldout_accuracy", "held-out acc."), ("heldout_auc", "held-out AUC")):
        lines.append(f"| {label} | " + " | ".join(f"{r[key]:.2f}" for r in rows) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--root", default="runs/bench_toyworld")
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--no-sweep", action="store_true", help="skip the per-layer SSI diagnostic (ssi_layer_sweep)")
    p.add_argument("--feature-text", default="raw", choices=("raw", "chat"),
                   help="config.data.feature_text for every stage (raw: the specification's and the toy config's)")
    p.add_argument("--world-version", type=int, default=BuildConfig.world_version, choices=world.WORLD_VERSIONS)
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    reports = {}
    for s in seeds:
        model = os.path.join(a.root, f"seed{s}", "model")
        t0 = time.time()
        if a.rebuild or not os.path.exists(os.path.join(model, "config.json")):
            build(model, BuildConfig.for_version(a.world_version, seed=s))
        build_s = time.time() - t0
        run_dir = os.path.join(a.root, f"seed{s}", "run" if a.feature_text == "raw" else f"run_{a.feature_text}")
        r = experiment.run_experiment(model, run_dir, seed=s, feature_text=a.feature_text)
        r["seconds"] = {"build": round(build_s, 1), "stages": r["seconds"]}
        if not a.no_sweep:
            r["ssi_layer_sweep"] = ssi_layer_sweep(model, os.path.join(a.root, f"seed{s}"), s, a.feature_text)
        reports[s] = r
        print(f"\n## seed {s}\n")
        print(experiment.format_report(r))
        if "ssi_layer_sweep" in r:
            print("\n" + format_sweep(r["ssi_layer_sweep"]))
        print(f"seconds: {r['seconds']}", flush=True)

    print("\n## across seeds\n")
    depths = [r["bottleneck"]["relative_depth"] for r in reports.values()]
    print("bottleneck relative depth per seed: " + ", ".join(f"{d:.2f}" for d in depths))
    print("\n| model | metric | " + " | ".join(TIERS) + " |\n|---|---|" + "---|" * len(TIERS))
    summary = {"seeds": seeds, "relative_depth": depths, "tiers": {}}
    for m in experiment.MODELS:
        for metric, _ in rep.SUMMARY_METRICS:
            cells = []
            for t in TIERS:
                vals = [rep.tier_mean(r["evaluation"]["models"][m], metric, t) for r in reports.values()]
                vals = [v for v in vals if v is not None]
                mean = statistics.mean(vals) if vals else None
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                summary["tiers"].setdefault(m, {}).setdefault(metric, {})[t] = {"mean": mean, "sd": sd, "per_seed": vals}
                cells.append("-" if mean is None else f"{100 * mean:.0f} ± {100 * sd:.0f}")
            print(f"| {m} | {metric} (%) | " + " | ".join(cells) + " |")
    with open(os.path.join(a.root, "summary.json" if a.feature_text == "raw" else f"summary_{a.feature_text}.json"), "w") as f:
        json.dump({"summary": summary, "reports": {str(k): v for k, v in reports.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
