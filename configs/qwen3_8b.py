"""qwen3-8b (LASA paper model). Usage:
  python -m lasa_jax.main --config=configs/qwen3_8b.py --config.model.path=/ckpt/DIR --config.workdir=runs/qwen3_8b
"""
from lasa_jax.presets import paper_model_config


def get_config():
    return paper_model_config("qwen3-8b")
