"""qwen2.5-32b (LASA paper model). Usage:
  python -m lasa_jax.main --config=configs/qwen2_5_32b.py --config.model.path=/ckpt/DIR --config.workdir=runs/qwen2_5_32b
align (float32 masters) needs 16 x 80 GB GPUs or a TPU v5p slice; the other stages fit on 8 x 80 GB.
"""
from lasa_jax.presets import paper_model_config


def get_config():
    return paper_model_config("qwen2.5-32b")
