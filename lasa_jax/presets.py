"""The paper's models: their architecture facts, the bottleneck layers the authors report, and
the run config each ``configs/<model>.py`` file returns.

Each paper model's config names its architecture (checked against the checkpoint's config.json
at load), the layer the authors report as its bottleneck (for reference in the report only: our
finder decides), and a default mesh (fsdp over all devices). On 8 x 80 GB GPUs every stage of
the 7-14B models fits; for the 32B models the feature stages and evaluation fit, but ``align``
with float32 masters and moments (18 bytes per parameter at its peak) needs about 79 GiB per
device by XLA's count, so train them on 16 such GPUs or a TPU v5p slice (bench/RESULTS.md, align
memory); the fit check says so before any weight is loaded.
"""
from __future__ import annotations

from typing import Any

from lasa_jax.errors import ConfigError
from lasa_jax.config import ARCH_FACTS, base_config
from lasa_jax.model.config import ModelConfig, RopeConfig

_QWEN25_ROPE = RopeConfig(theta=1_000_000.0)
_QWEN3_ROPE = RopeConfig(theta=1_000_000.0)
_LLAMA31_ROPE = RopeConfig(theta=500_000.0, kind="llama3", factor=8.0, low_freq_factor=1.0,
                           high_freq_factor=4.0, original_max_position_embeddings=8192)


def _known(family: str, vocab: int, d: int, layers: int, heads: int, kv: int, head_dim: int,
           mlp: int, **kw: Any) -> ModelConfig:
    return ModelConfig(family=family, vocab_size=vocab, hidden_size=d, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv, head_dim=head_dim, intermediate_size=mlp,
                       **kw)


# Architecture facts of the paper's models (from their config.json files). The per-model run
# configs state the same facts; the loader checks them against the checkpoint.
KNOWN_MODELS: dict[str, ModelConfig] = {
    "llama3.1-8b": _known("llama", 128256, 4096, 32, 32, 8, 128, 14336, rms_norm_eps=1e-5,
                          rope=_LLAMA31_ROPE, max_position_embeddings=131072),
    "qwen2.5-7b": _known("qwen2", 152064, 3584, 28, 28, 4, 128, 18944, qkv_bias=True,
                         rope=_QWEN25_ROPE, max_position_embeddings=32768),
    "qwen2.5-14b": _known("qwen2", 152064, 5120, 48, 40, 8, 128, 13824, qkv_bias=True,
                          rope=_QWEN25_ROPE, max_position_embeddings=32768),
    "qwen2.5-32b": _known("qwen2", 152064, 5120, 64, 40, 8, 128, 27648, qkv_bias=True,
                          rope=_QWEN25_ROPE, max_position_embeddings=32768),
    "qwen3-8b": _known("qwen3", 151936, 4096, 36, 32, 8, 128, 12288, qk_norm=True,
                       rope=_QWEN3_ROPE, max_position_embeddings=40960),
    "qwen3-14b": _known("qwen3", 151936, 5120, 40, 40, 8, 128, 17408, qk_norm=True,
                        rope=_QWEN3_ROPE, max_position_embeddings=40960),
    "qwen3-32b": _known("qwen3", 151936, 5120, 64, 64, 8, 128, 25600, qk_norm=True,
                        rope=_QWEN3_ROPE, max_position_embeddings=40960),
}


# Bottleneck layers reported by the LASA authors (k of L), for comparison with ours.
PAPER_BOTTLENECK = {"llama3.1-8b": 14, "qwen2.5-7b": 19, "qwen2.5-14b": 29, "qwen2.5-32b": 29,
                    "qwen3-8b": 21, "qwen3-14b": 25, "qwen3-32b": 42}


def paper_model_config(name: str, *, fsdp: int = -1, tensor: int = 1, remat: str = "full"):
    if name not in KNOWN_MODELS:
        raise ConfigError(f"unknown paper model {name!r}; known: {sorted(KNOWN_MODELS)}")
    arch = KNOWN_MODELS[name]
    c = base_config()
    c.workdir = f"runs/{name}"
    c.model.path = ""  # required: --config.model.path=/path/to/checkpoint
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.remat = remat
    for field in ARCH_FACTS:
        setattr(c.model.expect, field, getattr(arch, field))
    c.model.require_path = True
    c.model.paper_bottleneck = PAPER_BOTTLENECK[name]
    c.mesh.fsdp, c.mesh.tensor = fsdp, tensor
    c.lock()
    return c
