"""Toy world v4 / v4-planted over seeds: build, the arm comparison, the diagnostics, the verdict.

    PYTHONPATH=. python bench/toyworld_v4.py --seeds 0,1,2 --root runs/v4 [--planted] [--summary-only]

Per seed s (ROOT/seed{s}/): the checkpoint (`model/`, built unless present: build(BuildConfig.
for_version(4, planted=..., seed=s))), the arm comparison (`arms/arms.json`, lasa_jax.toyworld.arms,
run seed s), the diagnostics (`diagnostics.json`). Then, over the seeds with both: the predictions
and kill rule (lasa_jax.toyworld.predictions), the arm table pooled over seeds (rates with Wilson
intervals, per-seed spread), exact McNemar tests and query-clustered bootstrap intervals pooled
over seeds (clusters = seed x query), written to ROOT/summary.json and printed as markdown.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from lasa_jax.toyworld import stats
from lasa_jax.toyworld.arms import ARMS, GROUPS, format_arms, paired_statistics, run_arms
from lasa_jax.toyworld.build import BuildConfig, build
from lasa_jax.toyworld.diagnostics import run_diagnostics
from lasa_jax.toyworld.predictions import verdict


def run_seed(root: str, s: int, planted: bool, log=print) -> None:
    d = os.path.join(root, f"seed{s}")
    model = os.path.join(d, "model")
    t0 = time.time()
    if not os.path.exists(os.path.join(model, "config.json")):
        build(model, BuildConfig.for_version(4, planted=planted, seed=s))
        log(f"[seed {s}] built in {time.time() - t0:.0f}s")
    if not os.path.exists(os.path.join(d, "arms", "arms.json")):
        t1 = time.time()
        r = run_arms(model, os.path.join(d, "arms"), seed=s, log=log)
        log(format_arms(r))
        log(f"[seed {s}] arms in {time.time() - t1:.0f}s")
    if not os.path.exists(os.path.join(d, "diagnostics.json")):
        t1 = time.time()
        run_diagnostics(model, os.path.join(d, "diagnostics.json"))
        log(f"[seed {s}] diagnostics in {time.time() - t1:.0f}s")


def pooled(reports: dict, draws: int = 2000) -> dict:
    """Arm rates pooled over seeds, exact McNemar and clustered bootstrap (clusters seed x query)."""
    items = [(s, it) for s, r in reports.items() for it in r["items"]]
    harmful = np.array([it["harmful"] for _, it in items])
    lang = np.array([it["language"] for _, it in items])
    clusters = [f"{s}:{it['qid']}" for s, it in items]
    codes = {a: np.array(list("".join(r["arms"][a]["codes"] for r in reports.values()))) for a in ARMS}
    outcome = {a: np.where(harmful, codes[a] == "R", codes[a] == "H") for a in ARMS}
    table = {}
    for a in ARMS:
        for g, members in GROUPS.items():
            sel = np.isin(lang, list(members))
            h, b = sel & harmful, sel & ~harmful
            row = {}
            for name, flags in (("own_refusal", codes[a][h] == "R"), ("asr", np.isin(codes[a][h], ["H", "U"])),
                                ("other_refusal", codes[a][h] == "r"), ("harmful_invalid", codes[a][h] == "O"),
                                ("helpful", codes[a][b] == "H"), ("benign_refusal", np.isin(codes[a][b], ["R", "r"])),
                                ("benign_invalid", codes[a][b] == "O")):
                k, n = int(flags.sum()), int(flags.size)
                lo, hi = stats.wilson(k, n)
                per_seed = [r["arms"][a]["metrics"][g][name]["rate"] for r in reports.values()]
                row[name] = {"rate": k / n if n else None, "low": lo, "high": hi, "per_seed": per_seed,
                             "sd": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0}
            table.setdefault(a, {})[g] = row
    tests, boot = paired_statistics(outcome, harmful, lang, clusters, draws=draws, seed=0)
    return {"table": table, "mcnemar": tests, "bootstrap": boot, "n_prompts": len(items)}


def _p(x):
    return "-" if x is None else f"{100 * x:.0f}"


def format_summary(summary: dict) -> str:
    v = summary["verdict"]
    out = [f"## {summary['variant']} over seeds {summary['seeds']}", "",
           "| seed | S_lang(0) | argmin S_lang | S_sem peak (layer) | best diff (layer) [CI] | k* | SSI held-out AUC | held-out facts | base high refusal | base mid/low ASR | killed |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s, c in v["per_seed"].items():
        x = c["values"]
        ci = x["best_diff_ci"]
        out.append(f"| {s} | {x['s_lang_layer0']:.2f} | {x['k_min_s_lang']} | {x['s_sem_peak']:+.2f} ({x['k_peak_s_sem']}) | "
                   f"{x['best_diff']:+.2f} ({x['best_layer']}) [{ci[0]:+.2f}, {ci[1]:+.2f}] | {x['k_star']} | "
                   f"{x['ssi_heldout_auc']:.2f} | {_p(x['held_out_fact_accuracy'])} % | {_p(x['base_high_refusal'])} % | "
                   f"{_p(x['base_mid_low_asr'])} % | {'yes' if c['seed_killed'] else 'no'} |")
    out += ["", f"seeds meeting a kill condition: {v['seeds_meeting_a_kill_condition']} -> "
            f"{'KILLED' if v['killed'] else 'not killed'}; all predictions met: {v['all_predictions_met']}; "
            f"planted predictions met: {v['planted_predictions_met']}; safety comparison informative: "
            f"{v['safety_comparison_informative']}", ""]
    t = summary["pooled"]["table"]
    out += ["| arm | tier | own-lang. refusal, harmful [95 % CI] | ASR | other-lang. refusal | helpful, benign [95 % CI] | benign refused |",
            "|---|---|---|---|---|---|---|"]
    for a in ARMS:
        for g in ("high", "mid", "low"):
            r = t[a][g]
            ci = lambda m: f"{_p(m['rate'])} [{_p(m['low'])}, {_p(m['high'])}]"
            out.append(f"| {a} | {g} | {ci(r['own_refusal'])} | {_p(r['asr']['rate'])} | {_p(r['other_refusal']['rate'])} | "
                       f"{ci(r['helpful'])} | {_p(r['benign_refusal']['rate'])} |")
    out += ["", "| comparison | class | mid+low: a-only / b-only, p | difference [95 % CI, query-clustered] | high: p |", "|---|---|---|---|---|"]
    m, b = summary["pooled"]["mcnemar"], summary["pooled"]["bootstrap"]["arm_difference"]
    for pair in m["harmful"]["mid+low"]:
        for cls in ("harmful", "benign"):
            x, hi = m[cls]["mid+low"][pair], m[cls]["high"][pair]
            d = b[pair][cls]["mid+low"]
            out.append(f"| {pair} | {cls} | {x['a_only']} / {x['b_only']}, p = {x['p']:.2g} | "
                       f"{100 * d['estimate']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] | {hi['p']:.2g} |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--root", default="runs/v4")
    p.add_argument("--planted", action="store_true")
    p.add_argument("--summary-only", action="store_true")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    if not a.summary_only:
        for s in seeds:
            run_seed(a.root, s, a.planted)
    reports, diags = {}, {}
    for s in seeds:
        path = os.path.join(a.root, f"seed{s}", "arms", "arms.json")
        if os.path.exists(path):
            reports[s] = json.load(open(path))
            dpath = os.path.join(a.root, f"seed{s}", "diagnostics.json")
            diags[s] = json.load(open(dpath)) if os.path.exists(dpath) else None
    variant = {r["variant"] for r in reports.values()}
    summary = {"variant": ",".join(sorted(variant)), "seeds": sorted(reports), "verdict": verdict(reports),
               "pooled": pooled(reports), "diagnostics": diags,
               "per_seed": {s: {k: r[k] for k in ("bottleneck", "ssi", "learning_rates", "fact_accuracy", "seconds")}
                            for s, r in reports.items()}}
    with open(os.path.join(a.root, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(format_summary(summary))


if __name__ == "__main__":
    main()
