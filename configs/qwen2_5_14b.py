"""qwen2.5-14b (LASA paper model). Usage:
  python -m lasa_jax.main --config=configs/qwen2_5_14b.py --config.model.path=/ckpt/DIR --config.workdir=runs/qwen2_5_14b
"""
from lasa_jax.presets import paper_model_config


def get_config():
    return paper_model_config("qwen2.5-14b")
