"""Rotary position embeddings (rotate-half convention, as in HF LLaMA/Qwen)."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from lasa_jax.model.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Per-pair inverse frequencies, float32, computed in float64 on the host so that every
    backend gets identical tables."""
    inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope.kind == "llama3":
        # Llama 3.1 scaling: long wavelengths are slowed by `factor`, short ones kept, and the band
        # in between is interpolated smoothly.
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = ((rope.original_max_position_embeddings / wavelen - rope.low_freq_factor)
                  / (rope.high_freq_factor - rope.low_freq_factor))
        interpolated = (1 - smooth) * inv / rope.factor + smooth * inv
        inv = np.where(wavelen > low_wavelen, inv / rope.factor,
                       np.where(wavelen < high_wavelen, inv, interpolated))
    elif rope.kind != "default":
        raise ValueError(f"rope kind {rope.kind!r} is not supported")
    return inv.astype(np.float32)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
    """x: (batch, seq, heads, head_dim); positions: (batch, seq) int. Angles in float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (B, T, hd/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)
