"""qwen3-32b (LASA paper model). Usage:
  python -m lasa_jax.main --config=configs/qwen3_32b.py --config.model.path=/ckpt/DIR --config.workdir=runs/qwen3_32b
"""
from lasa_jax.presets import paper_model_config


def get_config():
    return paper_model_config("qwen3-32b")
