"""The toy world: all four LASA stages on the shipped toy checkpoint (lasa_jax/assets/toy_model).

A tiny LLaMA-family model (d=64, 6 layers) pretrained from scratch on ten synthetic languages
(high/mid/low resource tiers) and safety-tuned to refuse harmful intents in the high tier only;
world v2 (lasa_jax/toyworld/world.py), whose SFT also teaches that the refusal prefix means "refuse".
Runs on a CPU in a few minutes:

    python -m lasa_jax.main --config=configs/toy.py
    python -m lasa_jax.toyworld.experiment     # base vs baseline vs LASA, judged exactly

The synthetic languages carry MultiJail codes (en ... jv) as labels only, so the readers, tiers
and reports work unchanged; they share nothing with the real languages but the resource tier.
The pipeline's "refusal" judge knows no toy language, so the report it writes is meaningless
here; lasa_jax.toyworld.judge re-judges evaluate/generations.jsonl exactly (the experiment
command does this). Settings: lasa_jax/toyworld/config.py.
"""
from lasa_jax.toyworld.config import toy_config


def get_config():
    c = toy_config()
    c.lock()
    return c
