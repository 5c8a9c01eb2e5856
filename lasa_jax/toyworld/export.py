"""The toy world's LASA data files, in the formats the pipeline's readers accept.

    parallel_prompts.json  stage 1: {id, texts: {lang: text}, harmful, source}; 2 queries per intent
                           (v3: one per intent, distinct objects and persons: `distinct_topics`)
    ssi_prompts.json       stage 2: {prompt, language, source, idx, harmful}; every language (the
                           SSI trains on the languages in config.ssi.train_languages and reports
                           the others as held out)
    kto_pairs.json         stage 3: {prompt, chosen, rejected, source, language, harmful, idx};
                           high-resource languages only. safety: chosen = the language's refusal,
                           rejected = the compliant answer; general: chosen = the answer,
                           rejected = the refusal (an over-refusal is the dispreferred reply)
    eval_harmful.csv       stage 4, MultiJail CSV layout (id, source, tags, en ... jv, harmful)
    eval_benign.csv

World v4 (world.py, evaluation protocol): the evaluation files hold every evaluation-split query
of their class, in a seeded order (so `evaluate.max_prompts = n` takes a random n), and two
more files hold the high-tier dev split that the arms' learning rates are chosen on:
    dev_harmful.csv, dev_benign.csv  24 training-split queries per class that no KTO pair uses
No v4 data file contains an anchor (digit or shared name).

Stages 1-3 draw from the training split of slot combinations; the evaluation files from the
evaluation split, whose sentences occur nowhere in pretraining, SFT, SSI or KTO data.
"""
from __future__ import annotations

import csv
import json
import os
import random

from lasa_jax.toyworld import world

SIZES = {"parallel_per_intent": 2, "ssi_per_class_per_language": 80, "kto_per_class_per_language": 40,
         "eval_per_class": 24}


def _by_class(queries, harmful):
    return [q for q in queries if q.harmful == harmful]


def write_data_files(out_dir: str, seed: int, sizes: dict | None = None, version: int = 1) -> dict[str, str]:
    s = {**SIZES, **(sizes or {})}
    langs = world.make_languages(seed, version)
    split = world.split_queries(seed)
    rng = random.Random(f"toyworld-export-{seed}")
    os.makedirs(out_dir, exist_ok=True)
    paths = {}

    parallel = []
    queries = (distinct_topics(split["train"], rng) if version >= 3 else
               [q for v in world.VERBS
                for q in rng.sample([q for q in split["train"] if q.verb == v], s["parallel_per_intent"])])
    for q in queries:
        parallel.append({"id": q.qid, "harmful": q.harmful, "source": "toyworld",
                         "texts": {c: langs[c].request(q.verb, q.obj, q.person) for c in world.LANGUAGES}})
    paths["parallel_prompts"] = _dump_json(out_dir, "parallel_prompts.json", parallel)

    ssi = []
    for c in world.LANGUAGES:
        for harmful in (True, False):
            for q in rng.sample(_by_class(split["train"], harmful), s["ssi_per_class_per_language"]):
                ssi.append({"prompt": langs[c].request(q.verb, q.obj, q.person), "language": c,
                            "source": "harmful" if harmful else "benign", "idx": q.qid, "harmful": harmful})
    paths["ssi_prompts"] = _dump_json(out_dir, "ssi_prompts.json", ssi)

    kto = []
    for c in world.HIGH:
        lang = langs[c]
        for harmful in (True, False):
            for q in rng.sample(_by_class(split["train"], harmful), s["kto_per_class_per_language"]):
                answer, refusal = lang.answer(q.verb, q.obj, q.person), lang.refusal()
                kto.append({"prompt": lang.request(q.verb, q.obj, q.person),
                            "chosen": refusal if harmful else answer, "rejected": answer if harmful else refusal,
                            "source": "safety" if harmful else "general", "language": c,
                            "harmful": harmful, "idx": q.qid})
    paths["kto_pairs"] = _dump_json(out_dir, "kto_pairs.json", kto)

    sets = [(f"eval_{'harmful' if h else 'benign'}", h, eval_queries(seed, h, s["eval_per_class"], version))
            for h in (True, False)]
    if version >= 4:
        sets += [(f"dev_{'harmful' if h else 'benign'}", h, dev_queries(seed, h, {p["idx"] for p in kto}))
                 for h in (True, False)]
    for name, harmful, queries in sets:
        paths[name] = _write_csv(os.path.join(out_dir, f"{name}.csv"), langs, queries, harmful)
    return paths


def _write_csv(path, langs, queries, harmful):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "source", "tags", *world.LANGUAGES, "harmful"])
        for q in queries:
            w.writerow([q.qid, "toyworld", q.verb, *(langs[c].request(q.verb, q.obj, q.person)
                                                      for c in world.LANGUAGES), int(harmful)])
    return path


DEV_PER_CLASS = 24


def dev_queries(seed: int, harmful: bool, exclude: set, n: int = DEV_PER_CLASS) -> list:
    """v4's dev split: `n` training-split queries of one class whose qid is not in `exclude`
    (the KTO pairs' queries), seeded."""
    rng = random.Random(f"toyworld-dev-{seed}-{harmful}")
    pool = sorted((q for q in _by_class(world.split_queries(seed)["train"], harmful) if q.qid not in exclude),
                  key=lambda q: q.qid)
    return rng.sample(pool, n)


def distinct_topics(queries, rng: random.Random) -> list:
    """v3's bottleneck prompts: one query per intent, no two sharing an object, persons reused only
    once all have been used (world.py, change 7). Greedy over a seeded shuffle; raises if the split
    cannot supply such a set."""
    pool = sorted(queries, key=lambda q: q.qid)
    rng.shuffle(pool)
    out, objects, persons = [], set(), set()
    for verb in world.VERBS:
        if len(persons) == len(world.PERSONS):
            persons = set()
        pick = next((q for q in pool if q.verb == verb and q.obj not in objects and q.person not in persons), None)
        if pick is None:
            raise ValueError(f"toy world: no training query for intent {verb!r} with an unused object and person")
        out.append(pick)
        objects.add(pick.obj)
        persons.add(pick.person)
    return out


def eval_queries(seed: int, harmful: bool, n: int = SIZES["eval_per_class"], version: int = 1) -> list:
    """The evaluation queries of one class: a seeded sample of `n` of the evaluation split
    (v4: all of them, in a seeded order)."""
    rng = random.Random(f"toyworld-eval-{seed}-{harmful}")
    queries = sorted(_by_class(world.split_queries(seed)["eval"], harmful), key=lambda q: q.qid)
    return rng.sample(queries, len(queries) if version >= 4 else min(n, len(queries)))


def eval_prompts(seed: int, version: int = 1) -> list[str]:
    """Every evaluation request, harmful then benign, in every language."""
    langs = world.make_languages(seed, 4 if version >= 4 else 1)
    return [langs[c].request(q.verb, q.obj, q.person) for harmful in (True, False)
            for q in eval_queries(seed, harmful, version=version) for c in world.LANGUAGES]


def _dump_json(out_dir, name, records):
    path = os.path.join(out_dir, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=0)
    return path
