"""Tiny random checkpoints carrying the paper models' REAL tokenizers (tests/fixtures/real_tokenizers).

A directory holds random weights of a small model with the real ``vocab_size`` (widths and depth
shrunk; written with transformers' ``save_pretrained``), the real ``tokenizer.json`` (decompressed
from the fixture's ``.xz``), ``tokenizer_config.json``, ``chat_template.jinja`` and the real
``generation_config.json`` (its eos list). Built in temporary directories at test time; no weights
are committed.
"""
from __future__ import annotations

import json
import lzma
import os
import shutil

import torch
import transformers

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TOKENIZERS = os.path.join(FIXTURES, "real_tokenizers")
# Real-tokenizer family -> folder; each test model is named after it.
FAMILIES = ("llama3_1_instruct", "qwen2_5_instruct", "qwen3")
_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}
TOKENIZER_FILES = ("tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def reference_config(family: str) -> dict:
    with open(os.path.join(TOKENIZERS, family, "reference_config.json")) as f:
        return json.load(f)


def copy_tokenizer(family: str, directory: str) -> str:
    """The real tokenizer files of ``family`` in ``directory`` (tokenizer.json decompressed)."""
    os.makedirs(directory, exist_ok=True)
    src = os.path.join(TOKENIZERS, family)
    with lzma.open(os.path.join(src, "tokenizer.json.xz"), "rb") as f, \
            open(os.path.join(directory, "tokenizer.json"), "wb") as g:
        shutil.copyfileobj(f, g)
    for name in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(src, name), os.path.join(directory, name))
    return directory


def load_real_tokenizer(family: str, directory: str):
    return transformers.AutoTokenizer.from_pretrained(copy_tokenizer(family, directory), local_files_only=True)


def make_real_model(family: str, directory: str, *, hidden_size: int = 16, num_layers: int = 2,
                    num_heads: int = 2, num_kv_heads: int = 1, intermediate_size: int = 32, seed: int = 0) -> str:
    """A random ``family`` model with the real vocab_size and tiny widths, saved with the real
    tokenizer files (float32 safetensors, ~2 x vocab x hidden x 4 bytes)."""
    ref = reference_config(family)
    config_cls, model_cls = _CLASSES[ref["model_type"]]
    kwargs = dict(vocab_size=ref["vocab_size"], hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  rms_norm_eps=ref["rms_norm_eps"], max_position_embeddings=4096,
                  tie_word_embeddings=ref["tie_word_embeddings"], bos_token_id=ref["bos_token_id"],
                  eos_token_id=ref["eos_token_id"])
    rope = dict(ref.get("rope_scaling") or {"rope_type": "default"})
    rope["rope_theta"] = ref["rope_theta"]
    if rope["rope_type"] == "llama3":
        rope["original_max_position_embeddings"] = 64  # long prompts cross it, as in tests/hf_models.py
    if family == "qwen3":
        kwargs["head_dim"] = 8
    config = config_cls(**kwargs, rope_parameters=rope)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    copy_tokenizer(family, directory)
    return directory
