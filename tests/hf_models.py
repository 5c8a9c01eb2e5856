"""Tiny random Hugging Face checkpoints written locally with ``save_pretrained`` (no network)."""
from __future__ import annotations

import os

import torch
import transformers

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            rms_norm_eps=1e-6)

VARIANTS = {
    # Llama-3.1 rope scaling with a short original context so 300+ token prompts cross it.
    "llama3_f8": ("llama", dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                  high_freq_factor=4.0, original_max_position_embeddings=64),
                                rope_theta=500000.0, tie_word_embeddings=False)),
    "llama3_f32_tied": ("llama", dict(rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                        high_freq_factor=4.0, original_max_position_embeddings=128),
                                      rope_theta=500000.0, tie_word_embeddings=True)),
    "qwen2": ("qwen2", dict(rope_theta=1000000.0, tie_word_embeddings=False)),
    "qwen3": ("qwen3", dict(rope_theta=1000000.0, head_dim=24, tie_word_embeddings=True)),
}

_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}


def make_hf_model(variant: str, seed: int = 0, **overrides):
    family, extra = VARIANTS[variant]
    config_cls, model_cls = _CLASSES[family]
    kwargs = {**BASE, **extra, **overrides}
    rope = {}
    if "rope_scaling" in kwargs:
        rope = dict(kwargs.pop("rope_scaling"))
    rope["rope_theta"] = kwargs.pop("rope_theta")
    rope.setdefault("rope_type", "default")
    config = config_cls(**kwargs, rope_parameters=rope)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0; perturb them so they matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_hf_model(model, directory: str, max_shard_size: str | None = None) -> str:
    os.makedirs(directory, exist_ok=True)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kw)
    return directory
