"""Smoke test: a tiny random LLaMA-shaped model built locally, the project's fixtures, CPU.

Runs in a few minutes on a laptop and exercises every stage end to end; the numbers it prints
say nothing about LASA (the model is random). The embedded default is configs/toy.py.
"""
from lasa_jax.config import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/tiny"
    c.model.path = ""  # empty: build a tiny random checkpoint in the workdir
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.bottleneck.bootstrap_draws = 200
    c.align.learning_rate = 1e-4
    c.align.warmup_steps = 2
    c.align.batch_size = 8
    c.align.epochs = 1
    c.align.max_steps = 6
    c.align.max_length = 192
    c.align.max_prompt_length = 128
    c.align.checkpoint_every = 3
    c.evaluate.max_new_tokens = 24
    c.evaluate.max_prompts = 6
    c.evaluate.language_check = False
    c.lock()
    return c
