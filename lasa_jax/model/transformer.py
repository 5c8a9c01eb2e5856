"""One Flax (linen) decoder for the LLaMA-3.x / Qwen2.5 / Qwen3 family.

The three families differ only in flags of ``ModelConfig``: ``qkv_bias`` (Qwen2), ``qk_norm``
(Qwen3, whose ``head_dim`` may also differ from hidden/heads) and ``tie_embeddings``. Decoder
blocks are scanned, so parameters are stacked on a leading layer axis and compile time does not
grow with depth.

Attention is expressed over *cache slots*: queries sit at slots ``q_slots`` and attend to every
key slot ``s <= q_slot`` whose ``key_valid`` bit is set. A plain forward is the special case
where the slots are ``0..T-1`` and ``key_valid`` is the padding mask; prefill and cached decoding
reuse the same code with a KV cache, which is why there is a single attention path (save that
under ``attention_impl="cudnn"`` a forward without a cache passes its mask as causal + lengths).

Captured hidden states follow LASA's layer convention (identical to HF ``hidden_states``):
index 0 is the embedding output, k >= 1 the residual stream after block k, and index L is
after the final norm (as HF returns it).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lasa_jax.model.config import ModelConfig
from lasa_jax.model.rope import apply_rope, inverse_frequencies

CAPTURE_MODES = ("none", "last", "full")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_init = nn.initializers.normal(stddev=0.02)


def _param(module: nn.Module, name: str, init, shape: tuple[int, ...], axes: tuple[str, ...], dtype):
    """A parameter with the logical name of each dimension declared beside it; the mesh rules
    (``lasa_jax.infra.mesh.LOGICAL_RULES``) turn those names into its sharding. Stacked layer
    parameters get a leading "layers" axis from the scan."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class KVCache(NamedTuple):
    """Stacked per-layer cache. k, v: (layers, batch, slots, kv_heads, head_dim);
    key_valid: (batch, slots) bool; index: first free slot (same for every row)."""
    k: jax.Array
    v: jax.Array
    key_valid: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, slots: int, dtype: Any) -> "KVCache":
        shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch, slots), bool), jnp.zeros((), jnp.int32))


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str = "norm"  # logical name of the scale's dimension

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,), self.param_dtype)
        xf = x.astype(jnp.float32)  # variance in float32 whatever the compute dtype
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def dense_mask(q_slots, key_valid, num_slots):
    """(B, T, S) bool: query slot t sees key slot s <= t when s is valid."""
    k_slots = jnp.arange(num_slots)
    causal = k_slots[None, :] <= q_slots[:, None]  # (T, S)
    # A padding query still attends to its own slot so that no softmax row is empty (empty
    # rows give NaN, which would then leak into gradients through the masked sum).
    own = k_slots[None, :] == q_slots[:, None]
    return (causal[None] & key_valid[:, None, :]) | own[None]


class Attention(nn.Module):
    cfg: ModelConfig
    dtype: Any
    param_dtype: Any
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, positions, q_slots, key_valid, cache_kv=None, cache_index=None, layer=0):
        cfg, dt = self.cfg, self.dtype
        d, n, kvh, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        def proj(name, heads, heads_axis):
            w = _param(self, f"{name}_kernel", _init, (d, heads, hd), ("embed", heads_axis, "head_dim"),
                       self.param_dtype)
            y = jnp.einsum("btd,dnh->btnh", x, w.astype(dt))
            if cfg.qkv_bias:
                y = y + _param(self, f"{name}_bias", nn.initializers.zeros, (heads, hd),
                               (heads_axis, "head_dim"), self.param_dtype).astype(dt)
            return y

        q, k, v = proj("q_proj", n, "heads"), proj("k_proj", kvh, "kv_heads"), proj("v_proj", kvh, "kv_heads")
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, dt, self.param_dtype, "head_dim", name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, dt, self.param_dtype, "head_dim", name="k_norm")(k)
        inv_freq = inverse_frequencies(cfg.rope, hd)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)

        impl = self.attention_impl
        new_kv = None
        if cache_kv is not None:
            # The stacked cache is updated in place: only this token's slots of this layer are
            # written, and only this layer's slice is read, so a decode step moves one layer's
            # cache per layer instead of rewriting every layer's.
            ck, cv = cache_kv
            at = (layer, 0, cache_index, 0, 0)
            ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), at)
            cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), at)
            new_kv = (ck, cv)
            k = jax.lax.dynamic_index_in_dim(ck, layer, 0, keepdims=False)
            v = jax.lax.dynamic_index_in_dim(cv, layer, 0, keepdims=False)
            # cuDNN takes no dense mask, and left padding (generation) has no lengths form.
            impl = "xla" if impl == "cudnn" else impl
        if cache_kv is None and impl == "cudnn":
            # cuDNN's fused kernel takes masks only as causal + per-row lengths, which is exact
            # for right padding only: no-cache forwards under cudnn must be right-padded
            # (LanguageModel.encode's default). Outputs at padding queries differ (unused).
            lengths = key_valid.sum(-1).astype(jnp.int32)
            out = jax.nn.dot_product_attention(q.astype(dt), k.astype(dt), v.astype(dt), is_causal=True,
                                               query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                               implementation=impl)
        else:
            out = jax.nn.dot_product_attention(q.astype(dt), k.astype(dt), v.astype(dt),
                                               mask=dense_mask(q_slots, key_valid, k.shape[1])[:, None],
                                               implementation=impl)
        wo = _param(self, "o_proj_kernel", _init, (n, hd, d), ("heads", "head_dim", "embed"), self.param_dtype)
        return jnp.einsum("btnh,nhd->btd", out, wo.astype(dt)), new_kv


class MLP(nn.Module):
    cfg: ModelConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        d, f, dt = self.cfg.hidden_size, self.cfg.intermediate_size, self.dtype
        gate = _param(self, "gate_proj_kernel", _init, (d, f), ("embed", "mlp"), self.param_dtype)
        up = _param(self, "up_proj_kernel", _init, (d, f), ("embed", "mlp"), self.param_dtype)
        down = _param(self, "down_proj_kernel", _init, (f, d), ("mlp", "embed"), self.param_dtype)
        h = nn.silu(x @ gate.astype(dt)) * (x @ up.astype(dt))
        return h @ down.astype(dt)


def constrain(x, sharding):
    """Pin activations to the batch sharding (rows over data x fsdp). Without it the partitioner
    may choose to gather the batch instead of the FSDP-sharded weights."""
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


class Block(nn.Module):
    """One decoder block, written as a scan body: (carry, broadcast inputs) -> (carry, outputs).
    The carry is (hidden, layer index, whole stacked KV cache or None)."""
    cfg: ModelConfig
    dtype: Any
    param_dtype: Any
    capture: str = "none"
    attention_impl: str | None = None
    activation_sharding: Any = None

    @nn.compact
    def __call__(self, carry, positions, q_slots, key_valid, last_index, cache_index):
        x, layer, cache_kv = carry
        cfg = self.cfg
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name=name)
        attn, new_kv = Attention(cfg, self.dtype, self.param_dtype, self.attention_impl,
                                 name="self_attn")(norm("input_layernorm")(x), positions, q_slots,
                                                   key_valid, cache_kv, cache_index, layer)
        h = x + attn
        out = h + MLP(cfg, self.dtype, self.param_dtype, name="mlp")(norm("post_attention_layernorm")(h))
        out = constrain(out, self.activation_sharding)
        if self.capture == "last":
            captured = jnp.take_along_axis(out, last_index[:, None, None], axis=1)[:, 0]
        elif self.capture == "full":
            captured = out
        else:
            captured = None
        return (out, layer + 1, new_kv), captured


@dataclasses.dataclass(frozen=True)
class ForwardOutput:
    logits: jax.Array | None
    cache: KVCache | None
    hidden: jax.Array | None  # (L+1, B, d) for capture "last", (L+1, B, T, d) for "full"


class Transformer(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    attention_impl: str | None = None
    # NamedSharding for (batch, length, embed) activations; None = let XLA decide (one device).
    activation_sharding: Any = None
    # ``unroll`` of the layer scan (True = fully unrolled). Only bench/roofline.py sets it: XLA's
    # cost analysis counts a while-loop body once, so it compiles unrolled 1- and 2-layer models.
    scan_unroll: bool | int = 1

    @nn.compact
    def __call__(self, tokens, attention_mask=None, positions=None, *, capture: str = "none",
                 return_logits: bool = True, cache: KVCache | None = None):
        """tokens: (B, T) int. attention_mask: (B, T) bool, True on real tokens (left or right
        padding). positions default to the count of real tokens before each token, so a padded
        row sees the same rotary phases as the unpadded sequence.

        capture "last" returns each layer's hidden state at the last real token, "full" every
        token's; the stacked states are also sown into the ``intermediates`` collection.
        """
        cfg = self.cfg
        if capture not in CAPTURE_MODES:
            raise ValueError(f"capture={capture!r}; expected one of {CAPTURE_MODES}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        B, T = tokens.shape
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), bool)
        attention_mask = attention_mask.astype(bool)
        if positions is None:
            prior = cache.key_valid.sum(-1, keepdims=True) if cache is not None else 0
            positions = prior + jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
        # Last real token of each row, correct under left and right padding.
        last_index = T - 1 - jnp.argmax(attention_mask[:, ::-1], axis=-1)

        if cache is None:
            q_slots, key_valid, cache_index, cache_kv = jnp.arange(T), attention_mask, 0, None
        else:
            cache_index = cache.index
            q_slots = cache_index + jnp.arange(T)
            key_valid = jax.lax.dynamic_update_slice(cache.key_valid, attention_mask, (0, cache_index))
            cache_kv = (cache.k, cache.v)

        embed = _param(self, "embed_tokens", _init, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                       self.param_dtype)
        x = x_embed = constrain(jnp.take(embed, tokens, axis=0).astype(self.dtype), self.activation_sharding)

        block = Block
        if self.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        layers = nn.scan(
            block, variable_axes={"params": 0}, split_rngs={"params": True},
            metadata_params={nn.PARTITION_NAME: "layers"},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers, unroll=self.scan_unroll)
        (x, _, new_kv), captured = layers(cfg, self.dtype, self.param_dtype, capture,
                                          self.attention_impl, self.activation_sharding, name="layers")(
            (x, jnp.zeros((), jnp.int32), cache_kv), positions, q_slots, key_valid, last_index, cache_index)

        final_norm = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="norm")
        hidden = None
        if capture != "none":
            first = x_embed
            if capture == "last":
                first = jnp.take_along_axis(x_embed, last_index[:, None, None], axis=1)[:, 0]
            # HF's last hidden state is taken after the final norm; we follow it exactly.
            hidden = jnp.concatenate([first[None], captured[:-1], final_norm(captured[-1])[None]])
            self.sow("intermediates", "hidden_states", hidden)

        logits = None
        if return_logits:
            h = final_norm(x)
            if cfg.tie_embeddings:
                logits = jnp.einsum("btd,vd->btv", h, embed.astype(self.dtype),
                                    preferred_element_type=jnp.float32)
            else:
                head = _param(self, "lm_head", _init, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                              self.param_dtype)
                logits = jnp.einsum("btd,dv->btv", h, head.astype(self.dtype),
                                    preferred_element_type=jnp.float32)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(new_kv[0], new_kv[1], key_valid, cache_index + T)
        return ForwardOutput(logits, new_cache, hidden)


def param_specs(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Flat parameter path ("layers/mlp/up_proj_kernel", ...) -> (shape, logical axis names), read
    from the declarations above without allocating anything."""
    from flax import traverse_util
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda t: Transformer(cfg).init(jax.random.key(0), t), tokens)["params"]
    flat = traverse_util.flatten_dict(boxed, sep="/", is_leaf=lambda _, v: isinstance(v, nn.Partitioned))
    return {path: (tuple(box.value.shape), tuple(box.names)) for path, box in flat.items()}


def init_params(cfg: ModelConfig, key: jax.Array, *, dtype: Any = jnp.float32) -> dict:
    """Randomly initialised parameters (a plain nested dict of arrays, no partitioning boxes)."""
    module = Transformer(cfg, param_dtype=dtype)
    return nn.unbox(module.init(key, jnp.zeros((1, 4), jnp.int32)))["params"]
