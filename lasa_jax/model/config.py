"""Model configuration read from a Hugging Face ``config.json``.

Only the LLaMA/Qwen2/Qwen3 decoder family is supported. Every key of ``config.json`` is either
understood, known to be irrelevant to the forward pass, or an error: silently ignoring a setting
(sliding-window attention, another rope type, ...) would give wrong numbers without a word.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from lasa_jax.config import ARCH_FACTS
from lasa_jax.errors import ConfigError
from lasa_jax.infra import fileio

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

# Keys that do not change the forward pass (bookkeeping, generation defaults, tokenizer ids,
# training-only knobs). Anything not listed here or read below is rejected.
_IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache",
    "max_position_embeddings", "attention_dropout", "hidden_act", "pretraining_tp",
    "_name_or_path", "output_attentions", "output_hidden_states", "return_dict",
    "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "add_cross_attention", "tie_encoder_decoder", "architectures",
    "finetuning_task", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "cross_attention_hidden_size", "torchscript", "use_bfloat16",
    "pruned_heads", "tf_legacy_loss", "use_return_dict", "max_window_layers", "quantization_config",
    "layer_types", "embd_pdrop", "resid_pdrop", "rope_scaling", "rope_theta", "rope_parameters",
    "sliding_window", "use_sliding_window", "attention_bias", "mlp_bias", "head_dim",
    "tie_word_embeddings", "num_key_value_heads", "partial_rotary_factor", "model_name",
}

_ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
              "original_max_position_embeddings", "partial_rotary_factor"}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    # "default" or "llama3".
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: bias on q/k/v projections (never on o_proj)
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before rope
    max_position_embeddings: int = 131072

    def layer_params(self) -> int:
        """Parameters of one decoder layer (attention, MLP, its two norms)."""
        d, f = self.hidden_size, self.intermediate_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d
        if self.qkv_bias:
            attn += q + 2 * kv
        if self.qk_norm:
            attn += 2 * self.head_dim
        return attn + 3 * d * f + 2 * d

    def num_params(self) -> int:
        """Exact parameter count of the HF model with this config."""
        d, v = self.hidden_size, self.vocab_size
        emb = v * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * self.layer_params() + emb + d

    def attention_cost(self) -> float:
        """FLOPs of attention per token per attended key (QK^T and AV, every layer), relative to
        the token's matmul FLOPs through the weights (layers and LM head): a row of W tokens
        costs about W * (1 + attention_cost() * W) token-matmuls."""
        per_token = 2 * (self.num_layers * self.layer_params() + self.vocab_size * self.hidden_size)
        return 4 * self.num_heads * self.head_dim * self.num_layers / per_token

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _rope_from_hf(raw: dict[str, Any], where: str) -> RopeConfig:
    """Read rope settings from either the transformers v4 (rope_theta + rope_scaling) or the v5
    (rope_parameters) layout."""
    params = raw.get("rope_parameters")
    if params is None:
        params = dict(raw.get("rope_scaling") or {})
        if "rope_theta" in raw:
            params.setdefault("rope_theta", raw["rope_theta"])
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: field 'rope_parameters' must be an object, got {params!r}")
    unknown = set(params) - _ROPE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unsupported rope field(s) {sorted(unknown)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{where}: field 'partial_rotary_factor'={params['partial_rotary_factor']} "
                          "is not supported (only full rotary)")
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "llama3":
        try:
            return RopeConfig(
                theta=theta, kind="llama3", factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]))
        except KeyError as e:
            raise ConfigError(f"{where}: llama3 rope scaling lacks field {e.args[0]!r}") from None
    raise ConfigError(f"{where}: field 'rope_type'={kind!r} is not supported "
                      "(supported: default, llama3)")


def from_hf_dict(raw: dict[str, Any], where: str = "config.json") -> ModelConfig:
    archs = raw.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ConfigError(f"{where}: field 'architectures'={archs!r} is not supported "
                          f"(supported: {sorted(ARCHITECTURES)})")
    family = ARCHITECTURES[archs[0]]
    # transformers builds the model from model_type, not architectures: a mismatch means the
    # file describes two different models, and which one a reader gets depends on the reader.
    model_type = raw.get("model_type", _HF_MODEL_TYPE[family])
    if model_type != _HF_MODEL_TYPE[family]:
        raise ConfigError(f"{where}: field 'model_type'={model_type!r} does not match 'architectures'="
                          f"{archs!r} (expected model_type {_HF_MODEL_TYPE[family]!r})")

    # Settings that would change the computation and that we do not implement.
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: field 'hidden_act'={raw['hidden_act']!r} is not supported (silu only)")
    if raw.get("use_sliding_window", False):
        raise ConfigError(f"{where}: field 'use_sliding_window'=true is not supported")
    if family == "llama" and raw.get("sliding_window"):
        raise ConfigError(f"{where}: field 'sliding_window' is not supported")
    layer_types = raw.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ConfigError(f"{where}: field 'layer_types' has non-full attention layers, not supported")
    if raw.get("mlp_bias", False):
        raise ConfigError(f"{where}: field 'mlp_bias'=true is not supported")
    if raw.get("quantization_config"):
        raise ConfigError(f"{where}: field 'quantization_config' is set; quantized checkpoints are not supported")
    if raw.get("pretraining_tp", 1) not in (1, None):
        raise ConfigError(f"{where}: field 'pretraining_tp'={raw['pretraining_tp']} is not supported")

    attention_bias = bool(raw.get("attention_bias", family == "qwen2"))
    if family == "llama" and attention_bias:
        # LLaMA's attention_bias also puts a bias on o_proj, a layout we do not port.
        raise ConfigError(f"{where}: field 'attention_bias'=true is not supported for LlamaForCausalLM")
    if family == "qwen3" and attention_bias:
        raise ConfigError(f"{where}: field 'attention_bias'=true is not supported for Qwen3ForCausalLM")

    required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size"]
    missing = [k for k in required if k not in raw]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {missing}")
    known = _IGNORED_KEYS | set(required) | {"rms_norm_eps"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; refusing to guess their meaning")

    heads = int(raw["num_attention_heads"])
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    hidden = int(raw["hidden_size"])
    head_dim = int(raw.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise ConfigError(f"{where}: num_attention_heads={heads} is not a multiple of "
                          f"num_key_value_heads={kv_heads}")
    return ModelConfig(
        family=family,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(raw["intermediate_size"]),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf(raw, where),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" and attention_bias,
        qk_norm=family == "qwen3",
        max_position_embeddings=int(raw.get("max_position_embeddings", 131072)),
    )


def from_hf_config(path: str) -> ModelConfig:
    """Read ``path/config.json`` (or ``path`` itself if it is a file)."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if fileio.as_path(path).is_dir() else path
    if not fileio.exists(file):
        raise ConfigError(f"{file}: not found (expected a Hugging Face checkpoint directory)")
    try:
        raw = json.loads(fileio.read_text(file))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: malformed JSON ({e})") from None
    return from_hf_dict(raw, where=file)


def check_expected(cfg: ModelConfig, expected: dict[str, Any], where: str) -> None:
    """Compare architecture facts stated in a run config with the checkpoint's config.json."""
    bad = []
    for key, want in expected.items():
        if want is None:
            continue
        if key not in ARCH_FACTS:
            raise ConfigError(f"config.model.expect: unknown field {key!r} (known: {list(ARCH_FACTS)})")
        got = getattr(cfg, key)
        if got != want:
            bad.append(f"{key}: config says {want!r}, checkpoint has {got!r}")
    if bad:
        raise ConfigError(f"{where}: checkpoint does not match config.model.expect ({'; '.join(bad)})")


_HF_ARCH = {v: k for k, v in ARCHITECTURES.items()}
_HF_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def to_hf_dict(cfg: ModelConfig, **extra: Any) -> dict[str, Any]:
    """An HF config.json (transformers v5 layout) describing ``cfg``; used when we create
    checkpoints ourselves (the tiny default, the toy world)."""
    rope: dict[str, Any] = {"rope_type": cfg.rope.kind, "rope_theta": cfg.rope.theta}
    if cfg.rope.kind == "llama3":
        rope.update(factor=cfg.rope.factor, low_freq_factor=cfg.rope.low_freq_factor,
                    high_freq_factor=cfg.rope.high_freq_factor,
                    original_max_position_embeddings=cfg.rope.original_max_position_embeddings)
    out = {
        "architectures": [_HF_ARCH[cfg.family]],
        "model_type": _HF_MODEL_TYPE[cfg.family],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "silu",
    }
    if cfg.family == "qwen2":
        out["attention_bias"] = cfg.qkv_bias
    out.update(extra)
    return out
