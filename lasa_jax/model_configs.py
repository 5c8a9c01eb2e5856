"""Shared body of the per-model run configs in ``configs/``.

Each paper model gets one config file that names its architecture (checked against the
checkpoint's config.json at load), the layer the authors report as its bottleneck (for
reference in the report only: our finder decides), and a mesh that fits on 8 x 80 GB GPUs.
"""
from __future__ import annotations

from lasa_jax.config import base_config
from lasa_jax.fitcheck import KNOWN_MODELS

# Bottleneck layers reported by the LASA authors (k of L), for comparison with ours.
PAPER_BOTTLENECK = {"llama3.1-8b": 14, "qwen2.5-7b": 19, "qwen2.5-14b": 29, "qwen2.5-32b": 29,
                    "qwen3-8b": 21, "qwen3-14b": 25, "qwen3-32b": 42}


def paper_model_config(name: str, *, fsdp: int = -1, tensor: int = 1, remat: str = "full"):
    if name not in KNOWN_MODELS:
        raise KeyError(f"unknown paper model {name!r}; known: {sorted(KNOWN_MODELS)}")
    arch = KNOWN_MODELS[name]
    c = base_config()
    c.workdir = f"runs/{name}"
    c.model.path = ""  # required: --config.model.path=/path/to/checkpoint
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.remat = remat
    for field in ("family", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "intermediate_size", "tie_embeddings"):
        setattr(c.model.expect, field, getattr(arch, field))
    c.model.require_path = True
    c.model.paper_bottleneck = PAPER_BOTTLENECK[name]
    c.mesh.fsdp, c.mesh.tensor = fsdp, tensor
    c.lock()
    return c
