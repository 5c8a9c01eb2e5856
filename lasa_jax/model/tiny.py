"""A tiny random checkpoint built locally, so the default run needs no download."""
from __future__ import annotations

import inspect
import json
import os

import jax

from lasa_jax.errors import ConfigError
from lasa_jax.infra.fileio import as_path, staged_dir
from lasa_jax.model.checkpoint import save_params
from lasa_jax.model.config import ModelConfig, RopeConfig, to_hf_dict
from lasa_jax.model.transformer import init_params


def tiny_model_config(family: str, vocab_size: int, *, hidden_size: int = 64, num_layers: int = 4,
                      num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128) -> ModelConfig:
    return ModelConfig(
        family=family, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=hidden_size // num_heads,
        intermediate_size=intermediate_size, rms_norm_eps=1e-6,
        rope=RopeConfig(theta=10000.0), tie_embeddings=family == "qwen3",
        qkv_bias=family == "qwen2", qk_norm=family == "qwen3", max_position_embeddings=2048)


BUILD_FILE = "tiny.json"  # what the checkpoint was built from: family, sizes, seed
_DEFAULT_SIZES = {name: p.default for name, p in inspect.signature(tiny_model_config).parameters.items()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY}


def check_tiny_checkpoint(directory: str, *, family: str = "llama", seed: int = 0, **sizes) -> bool:
    """True if ``directory`` holds a tiny checkpoint built from exactly these settings, False if
    there is none; a checkpoint built from other settings is a ``ConfigError`` naming the
    difference (every artifact in its workdir belongs to that other model, so it is neither
    reused nor silently rebuilt)."""
    if not (as_path(directory) / "config.json").exists():
        return False
    want = {"family": family, "seed": seed, **_DEFAULT_SIZES, **sizes}
    build = as_path(directory) / BUILD_FILE
    try:
        have = json.loads(build.read_text(encoding="utf-8"))
    except FileNotFoundError:  # built before the build file existed: compare config.json
        from lasa_jax.model.config import from_hf_config
        have = {**from_hf_config(directory).to_dict(), "seed": seed}
    except json.JSONDecodeError as e:
        raise ConfigError(f"{build}: not valid JSON ({e.msg}); remove {directory} to rebuild it") from None
    diff = [f"{'config.seed' if k == 'seed' else 'config.model.tiny.' + k}={v!r} but it was built with {have.get(k)!r}"
            for k, v in want.items() if have.get(k) != v]
    if diff:
        raise ConfigError(f"{directory}: this workdir's tiny model differs from the config ({'; '.join(diff)}); "
                          "use another workdir, or remove the directory and the artifacts built on it")
    return True


def make_tiny_checkpoint(directory: str, *, family: str = "llama", seed: int = 0, **sizes) -> str:
    """Random-init a tiny decoder with our own init, save it as an HF checkpoint directory with a
    byte-level tokenizer and chat template. An existing checkpoint built from the same settings is
    reused; one built from other settings is an error (``check_tiny_checkpoint``). ``directory``
    may be a URL. Call it on one process (it writes)."""
    from lasa_jax.model.tokenizers import build_byte_tokenizer
    if check_tiny_checkpoint(directory, family=family, seed=seed, **sizes):
        return directory
    style = "llama3" if family == "llama" else "qwen"
    tokenizer = build_byte_tokenizer(style)
    cfg = tiny_model_config(family, len(tokenizer), **sizes)
    params = jax.jit(lambda key: init_params(cfg, key))(jax.random.key(seed))
    hf = to_hf_dict(cfg, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    with staged_dir(directory, "config.json") as stage:
        save_params(params, cfg, stage.path, hf_config=hf)
        tokenizer.save_pretrained(stage.path)
        with open(os.path.join(stage.path, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                       "do_sample": False}, f)
        with open(os.path.join(stage.path, BUILD_FILE), "w") as f:
            json.dump({"family": family, "seed": seed, **_DEFAULT_SIZES, **sizes}, f)
    return directory
