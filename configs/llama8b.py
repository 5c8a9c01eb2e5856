"""llama3.1-8b (LASA paper model). Usage:
  python -m lasa_jax.main --config=configs/llama8b.py --config.model.path=/ckpt/DIR --config.workdir=runs/llama8b
"""
from lasa_jax.presets import paper_model_config


def get_config():
    return paper_model_config("llama3.1-8b")
