"""The toy world end to end for several seeds: world + checkpoint + the four stages + the baseline.

    PYTHONPATH=. python bench/toyworld.py [--seeds 0,1,2] [--root runs/bench_toyworld] [--rebuild] [--world-version 2]

For each seed s: build the world and checkpoint from seed s (skipped when
ROOT/seed{s}/model exists, unless --rebuild), then run lasa_jax.toyworld.experiment with run
seed s. Prints, per seed, the layer-wise S_sem - S_lang curve, the bottleneck's relative depth and
the per-language ASR of base / baseline / LASA; then tier means across seeds. Writes
ROOT/summary.json. On 2 shared CPU cores one seed takes roughly 5-10 minutes (build 4-7, stages 1-2).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from lasa_jax import report as rep
from lasa_jax.toyworld import experiment, world
from lasa_jax.toyworld.build import BuildConfig, build


TIERS = tuple(world.TIERS)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--root", default="runs/bench_toyworld")
    p.add_argument("--rebuild", action="store_true")
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
        r = experiment.run_experiment(model, os.path.join(a.root, f"seed{s}", "run"), seed=s)
        r["seconds"] = {"build": round(build_s, 1), "stages": r["seconds"]}
        reports[s] = r
        print(f"\n## seed {s}\n")
        print(experiment.format_report(r))
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
    with open(os.path.join(a.root, "summary.json"), "w") as f:
        json.dump({"summary": summary, "reports": {str(k): v for k, v in reports.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
