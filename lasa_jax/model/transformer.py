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
    """Per-layer keys and values. k, v: one stacked (layers, batch, slots, kv_heads, head_dim)
    array for the scanned model, a tuple of per-layer (batch, slots, kv_heads, head_dim) arrays
    for the unrolled one (``scan_layers=False``); key_valid: (batch, slots) bool; index: first
    free slot (same for every row)."""
    k: Any
    v: Any
    key_valid: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, slots: int, dtype: Any, *, stacked: bool = True) -> "KVCache":
        shape = (batch, slots, cfg.num_kv_heads, cfg.head_dim)
        if stacked:
            kv = lambda: jnp.zeros((cfg.num_layers, *shape), dtype)
        else:
            kv = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return cls(kv(), kv(), jnp.zeros((batch, slots), bool), jnp.zeros((), jnp.int32))


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


def dense(x, w, **kw):
    """x (..., k) @ w (k, n) as one 2-D matmul over the flattened leading dims. Why: the weight
    gradient of a (B, T, k) x (k, n) product contracts two dims, which XLA:CPU runs far slower
    than the (B*T, k) one (MLP forward+backward at 8 x 192 x 512 -> 1536: 0.18 s vs 0.13 s)."""
    return jnp.matmul(x.reshape(-1, x.shape[-1]), w, **kw).reshape(*x.shape[:-1], w.shape[-1])


def dense_mask(q_slots, key_valid, num_slots):
    """(B, T, S) bool: query slot t sees key slot s <= t when s is valid. Packed rows (no cache)
    pass int segment ids as ``key_valid`` (0 = padding): then only keys of the query's segment."""
    k_slots = jnp.arange(num_slots)
    causal = k_slots[None, :] <= q_slots[:, None]  # (T, S)
    # A padding query still attends to its own slot so that no softmax row is empty (empty
    # rows give NaN, which would then leak into gradients through the masked sum).
    own = k_slots[None, :] == q_slots[:, None]
    if key_valid.dtype == jnp.bool_:
        valid = key_valid[:, None, :]
    else:
        valid = (key_valid[:, None, :] == key_valid[:, :, None]) & (key_valid[:, None, :] > 0)
    return (causal[None] & valid) | own[None]


def segment_positions(segment_ids):
    """(B, T) int segment ids of packed rows -> each token's position within its segment."""
    idx = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    return idx - jax.lax.cummax(jnp.where(segment_ids != prev, idx, 0), axis=1)


def causal_attention(q, k, v, mask, implementation=None):
    """``jax.nn.dot_product_attention`` of a forward without a cache (query t at key slot t), in
    blocks of queries: a block attends to the keys up to its last query only, since every later
    key is masked for all of its queries. Same result, about half the work of the dense square,
    which XLA otherwise computes in full (CPU, 8 x 192 tokens, 8/4 heads of 64, forward and
    backward: 0.052 s dense, 0.023 s in blocks, torch's SDPA 0.033 s). At most 8 blocks of >= 64
    queries, so the unrolled blocks stay few."""
    T = q.shape[1]
    block = max(64, -(-T // 8))
    attend = lambda s, e: jax.nn.dot_product_attention(q[:, s:e], k[:, :e], v[:, :e], mask=mask[:, :, s:e, :e],
                                                        implementation=implementation)
    if T <= block:
        return attend(0, T)
    return jnp.concatenate([attend(s, min(T, s + block)) for s in range(0, T, block)], axis=1)


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
            y = dense(x, w.astype(dt).reshape(d, heads * hd)).reshape(*x.shape[:2], heads, hd)
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
            # The cache is updated in place: only this token's slots of this layer are
            # written, and only this layer's slice is read, so a decode step moves one layer's
            # cache per layer instead of rewriting every layer's.
            ck, cv = cache_kv
            if isinstance(ck, tuple):  # one array per layer, ``layer`` a Python int (unrolled)
                at = (0, cache_index, 0, 0)
                k = jax.lax.dynamic_update_slice(ck[layer], k.astype(ck[layer].dtype), at)
                v = jax.lax.dynamic_update_slice(cv[layer], v.astype(cv[layer].dtype), at)
                new_kv = (ck[:layer] + (k,) + ck[layer + 1:], cv[:layer] + (v,) + cv[layer + 1:])
            else:
                at = (layer, 0, cache_index, 0, 0)
                ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), at)
                cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), at)
                new_kv = (ck, cv)
                k = jax.lax.dynamic_index_in_dim(ck, layer, 0, keepdims=False)
                v = jax.lax.dynamic_index_in_dim(cv, layer, 0, keepdims=False)
        if cache_kv is not None or key_valid.dtype != jnp.bool_:
            # cuDNN takes masks only as causal + per-row lengths: left padding (generation) and
            # packed segments have no such form.
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
            mask = dense_mask(q_slots, key_valid, k.shape[1])[:, None]
            attend = jax.nn.dot_product_attention if cache_kv is not None else causal_attention
            out = attend(q.astype(dt), k.astype(dt), v.astype(dt), mask=mask, implementation=impl)
        wo = _param(self, "o_proj_kernel", _init, (n, hd, d), ("heads", "head_dim", "embed"), self.param_dtype)
        return dense(out.reshape(*out.shape[:2], n * hd), wo.astype(dt).reshape(n * hd, d)), new_kv


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
        h = nn.silu(dense(x, gate.astype(dt))) * dense(x, up.astype(dt))
        return dense(h, down.astype(dt))


def constrain(x, sharding):
    """Pin activations to the batch sharding (rows over data x fsdp). Without it the partitioner
    may choose to gather the batch instead of the FSDP-sharded weights."""
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


class Block(nn.Module):
    """One decoder block, written as a scan body: (carry, broadcast inputs) -> (carry, outputs).
    The carry is (hidden, layer index, KV cache or None): the whole stacked cache under the
    scan, per-layer arrays with a Python layer index when unrolled (``scan_layers=False``)."""
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
            captured = jnp.take_along_axis(out, last_index[:, :, None], axis=1)  # (B, K, d)
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
    # False: one parameter tree per layer ("layers_0", ...) and the blocks unrolled, the decode
    # layout (LanguageModel.for_decoding, see ``unstack_layers``). A decode step is bound by
    # reading the weights; sliced out of stacked arrays they are copied first on XLA:CPU (3x the
    # weight traffic per step, bench/roofline.py), separate arrays are read where they lie.
    scan_layers: bool = True

    @nn.compact
    def __call__(self, tokens, attention_mask=None, positions=None, *, capture: str = "none",
                 return_logits: bool = True, cache: KVCache | None = None, segment_ids=None,
                 capture_index=None):
        """tokens: (B, T) int. attention_mask: (B, T) bool, True on real tokens (left or right
        padding). positions default to the count of real tokens before each token, so a padded
        row sees the same rotary phases as the unpadded sequence.

        capture "last" returns each layer's hidden state at the last real token, "full" every
        token's; the stacked states are also sown into the ``intermediates`` collection.

        Packed rows (no cache): ``segment_ids`` (B, T) int, 0 on padding, replaces the mask; each
        segment attends only to itself and its positions restart at 0. ``capture_index`` (B, K)
        then names the positions capture "last" reads, giving (L+1, B, K, d).
        """
        cfg = self.cfg
        if capture not in CAPTURE_MODES:
            raise ValueError(f"capture={capture!r}; expected one of {CAPTURE_MODES}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        B, T = tokens.shape
        if segment_ids is not None:
            if cache is not None or attention_mask is not None:
                raise ValueError("segment_ids (packed rows) replace attention_mask and take no cache")
            attention_mask = segment_ids > 0
            if positions is None:
                positions = segment_positions(segment_ids)
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), bool)
        attention_mask = attention_mask.astype(bool)
        if positions is None:
            prior = cache.key_valid.sum(-1, keepdims=True) if cache is not None else 0
            positions = prior + jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
        # Last real token of each row, correct under left and right padding.
        last_index = capture_index
        if last_index is None:
            last_index = (T - 1 - jnp.argmax(attention_mask[:, ::-1], axis=-1))[:, None]

        if cache is None:
            key_valid = attention_mask if segment_ids is None else segment_ids.astype(jnp.int32)
            q_slots, cache_index, cache_kv = jnp.arange(T), 0, None
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
        block_args = (cfg, self.dtype, self.param_dtype, capture, self.attention_impl, self.activation_sharding)
        inputs = (positions, q_slots, key_valid, last_index, cache_index)
        carry = (x, jnp.zeros((), jnp.int32), cache_kv)
        if self.scan_layers:
            layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                metadata_params={nn.PARTITION_NAME: "layers"},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers, unroll=self.scan_unroll)
            carry, captured = layers(*block_args, name="layers")(carry, *inputs)
        else:
            captures = []
            for i in range(cfg.num_layers):
                # A Python layer index: each block updates its own cache array (see KVCache).
                carry, cap = block(*block_args, name=f"layers_{i}")((carry[0], i, carry[2]), *inputs)
                captures.append(cap)
            captured = None if capture == "none" else jnp.stack(captures)
        x, _, new_kv = carry

        final_norm = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="norm")
        hidden = None
        if capture != "none":
            first = x_embed
            if capture == "last":
                first = jnp.take_along_axis(x_embed, last_index[:, :, None], axis=1)
            # HF's last hidden state is taken after the final norm; we follow it exactly.
            hidden = jnp.concatenate([first[None], captured[:-1], final_norm(captured[-1])[None]])
            if capture == "last" and capture_index is None:
                hidden = hidden[:, :, 0]  # (L+1, B, d)
            self.sow("intermediates", "hidden_states", hidden)

        logits = None
        if return_logits:
            h = final_norm(x)
            if cfg.tie_embeddings:
                logits = dense(h, embed.astype(self.dtype).T, preferred_element_type=jnp.float32)
            else:
                head = _param(self, "lm_head", _init, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                              self.param_dtype)
                logits = dense(h, head.astype(self.dtype), preferred_element_type=jnp.float32)
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


def unstack_layers(params: dict, num_layers: int) -> dict:
    """Stacked layer parameters ("layers", leading axis L) -> one tree per layer ("layers_0" ..),
    the layout of ``Transformer(scan_layers=False)``; their shardings: ``lm.unstacked_shardings``."""
    rest = {k: v for k, v in params.items() if k != "layers"}
    return {**rest, **{f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], params["layers"])
                       for i in range(num_layers)}}


def init_params(cfg: ModelConfig, key: jax.Array, *, dtype: Any = jnp.float32) -> dict:
    """Randomly initialised parameters (a plain nested dict of arrays, no partitioning boxes)."""
    module = Transformer(cfg, param_dtype=dtype)
    return nn.unbox(module.init(key, jnp.zeros((1, 4), jnp.int32)))["params"]
