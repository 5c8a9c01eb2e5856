"""The run configuration of the toy world (configs/toy.py is a thin wrapper around it)."""
from __future__ import annotations

import os

from lasa_jax.config import base_config

TOY_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "toy_model")

# What a toy checkpoint of each variant can and cannot show (printed with its results).
WORLD_LABELS = {
    "v4-planted": ("toy world v4-planted, a PLANTED POSITIVE CONTROL: the semantic bottleneck was trained into "
                   "the model (an alignment loss at layer 4 during pretraining), it did not emerge; the run tests "
                   "bottleneck -> SSI -> gate -> refusal when a bottleneck exists, not that one forms"),
    "v4": "toy world v4 (no semantic bottleneck formed in it; see bench/RESULTS.md)",
    "v3": "toy world v3 (the leak is reproduced, no semantic bottleneck forms; see bench/RESULTS.md)",
}


def world_label(model_path: str) -> str:
    """One line naming the toy world a checkpoint was built from and what it can show."""
    import json
    try:
        with open(os.path.join(model_path, "toyworld.json"), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return "not a toy-world checkpoint"
    variant = info.get("variant", f"v{info.get('world_version', 1)}")
    return f"{WORLD_LABELS.get(variant, 'toy world ' + variant)} [seed {info.get('seed')}]"


def toy_config(model_path: str = TOY_MODEL, workdir: str = "runs/toy"):
    """All four stages and the baseline on a toy checkpoint, judged exactly (evaluate.judge =
    "toyworld"). Data files are the ones written into the checkpoint (`<model>/data/`).
    Stage-3 settings are scaled for a ~0.3M-parameter model (lr 3e-4 rather than 1e-6, 2 epochs
    of 640 items) and were fixed before any evaluation-language result was seen."""
    c = base_config()
    c.workdir = workdir
    c.stages = "bottleneck,ssi,align,baseline,evaluate"
    c.model.path = model_path
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    # Relative to the model directory, so --config.model.path=<another toy build> brings its own data.
    c.data.parallel_prompts = "model:data/parallel_prompts.json"
    c.data.ssi_prompts = "model:data/ssi_prompts.json"
    c.data.kto_pairs = "model:data/kto_pairs.json"
    c.data.eval_harmful = "model:data/eval_harmful.csv"
    c.data.eval_benign = "model:data/eval_benign.csv"
    c.data.languages = "en,zh,it,vi,ar,ko,th,bn,sw,jv"
    c.bottleneck.batch_size = 64
    c.bottleneck.bootstrap_draws = 200
    c.ssi.train_languages = ("en", "zh", "it", "vi")  # the high-resource tier
    c.ssi.batch_size_features = 64
    c.align.learning_rate = 3e-4
    c.align.warmup_steps = 10
    c.align.batch_size = 16
    c.align.epochs = 2
    c.align.max_length = 64
    c.align.max_prompt_length = 48
    # 80 steps of short items: compiling a second step shape cost more than the padding it
    # saved (README run 62 s with one shape, 110 s with two).
    c.align.step_shapes = 1
    c.align.checkpoint_every = 1000
    c.evaluate.max_new_tokens = 24
    # 24 queries per set and language: all of a v1-v3 file; a seeded random 24 of a v4 file, which
    # holds every evaluation-split query (the arm comparison, toyworld/arms.py, evaluates them all).
    c.evaluate.max_prompts = 24
    c.evaluate.batch_size = 64
    c.evaluate.language_check = False  # lingua knows no synthetic language
    c.evaluate.judge = "toyworld"
    return c
