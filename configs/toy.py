"""The embedded default: the four LASA stages and the baseline on the shipped toy checkpoint.

    python -m lasa_jax.main --config=configs/toy.py

The checkpoint (lasa_jax/assets/toy_model, ~2 MB) is a tiny LLaMA-family model (d=64, 6 layers)
pretrained from scratch on ten synthetic languages (high/mid/low resource tiers), instruction
tuned in every language and safety tuned to refuse harmful intents in the high tier only (world
v3, lasa_jax/toyworld/world.py). The run prints the per-language ASR table of base vs baseline
(plain KTO on the same pairs, no SSI or prefix) vs aligned (LASA), judged exactly by the world's
own judge. The synthetic languages carry MultiJail codes (en ... jv) as labels only, so readers,
tiers and reports work unchanged; they share nothing with the real languages but the tier.
Rebuild the checkpoint: python -m lasa_jax.toyworld.build --out lasa_jax/assets/toy_model --seed 0
Settings: lasa_jax/toyworld/config.py.
"""
from lasa_jax.toyworld.config import TOY_MODEL, toy_config, world_label


def get_config():
    c = toy_config()
    c.lock()
    print(f"configs/toy.py: the default checkpoint is {world_label(TOY_MODEL)}", flush=True)
    return c
