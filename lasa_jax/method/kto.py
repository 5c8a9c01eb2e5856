"""Stage 3 losses: Latent KTO (TRL's KTOTrainer formula) and the cross-lingual alignment term.

All arithmetic is float32 whatever the dtype of the logits (bf16 on accelerators).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logps(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """(B,T,V), (B,T) -> (B,T): out[:, t] = log p(tokens[:, t] | tokens[:, <t]) for t >= 1, out[:, 0] = 0.

    Kept aligned with `tokens` (not shifted to T-1) so a loss mask over target tokens applies directly.
    """
    # gather - logsumexp instead of a full log_softmax: no (B,T,V) float32 array has to be kept,
    # XLA fuses the upcast into the reduction.
    x = logits[:, :-1]
    picked = jnp.take_along_axis(x, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    logp = picked.astype(jnp.float32) - jax.nn.logsumexp(x.astype(jnp.float32), axis=-1)
    return jnp.pad(logp, ((0, 0), (1, 0)))


def completion_logps(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """(B,): sum of log p over the tokens where loss_mask (indexed like `tokens`) is set."""
    return jnp.sum(jnp.where(loss_mask, token_logps(logits, tokens), 0.0), axis=-1)


def item_logps(logits: jax.Array, tokens: jax.Array, items: jax.Array, loss_mask: jax.Array,
               num_items: int) -> jax.Array:
    """(num_items,): completion log-probs of packed rows. ``items`` (B, T) names each token's item
    (1 ... num_items; 0 on padding); an item's first token must carry no loss, as its log-prob
    would come from the previous item's last logit."""
    w = jnp.where(loss_mask & (items > 0), token_logps(logits, tokens), 0.0)
    return jax.ops.segment_sum(w.reshape(-1), items.reshape(-1), num_segments=num_items + 1)[1:]


def kto_loss(
    policy_logps: jax.Array,
    ref_logps: jax.Array,
    policy_kl_logps: jax.Array,
    ref_kl_logps: jax.Array,
    desirable: jax.Array,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """KTO loss exactly as TRL's KTOTrainer (loss_type="kto") computes it, on one global batch.

    r = policy - ref; z_ref = max(0, mean over valid items of (policy_kl - ref_kl)), no gradient;
    desirable items: w_D (1 - sigmoid(beta (r - z_ref))), undesirable: w_U (1 - sigmoid(beta (z_ref - r))).
    TRL concatenates the weighted chosen and rejected losses and takes a plain mean, so the loss is
    sum(weighted losses) / number of valid items (the weights do not renormalise it).
    `valid` (B,) bool drops padding items of a fixed-size batch from every mean.

    Metrics follow TRL's names and definitions: rewards/* are beta * r averaged per class.
    With data parallelism TRL averages per-device KL means; this uses the global item mean, which
    is the same when every device holds the same number of valid items.
    """
    f32 = jnp.float32
    policy_logps, ref_logps = policy_logps.astype(f32), ref_logps.astype(f32)
    policy_kl_logps, ref_kl_logps = policy_kl_logps.astype(f32), ref_kl_logps.astype(f32)
    desirable = desirable.astype(bool)
    valid = jnp.ones_like(desirable) if valid is None else valid.astype(bool)
    n_valid = jnp.sum(valid)
    safe_n = jnp.maximum(n_valid, 1).astype(f32)

    kl = jnp.sum(jnp.where(valid, policy_kl_logps - ref_kl_logps, 0.0)) / safe_n
    z_ref = jax.lax.stop_gradient(jnp.maximum(kl, 0.0))

    r = policy_logps - ref_logps
    chosen_losses = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (r - z_ref)))
    rejected_losses = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z_ref - r)))
    per_item = jnp.where(desirable, chosen_losses, rejected_losses)
    loss = jnp.sum(jnp.where(valid, per_item, 0.0)) / safe_n

    is_chosen, is_rejected = valid & desirable, valid & ~desirable
    n_chosen, n_rejected = jnp.sum(is_chosen), jnp.sum(is_rejected)
    rewards = jax.lax.stop_gradient(beta * r)
    # Classes absent from the batch report 0 (TRL skips the metric instead).
    rew_chosen = jnp.sum(jnp.where(is_chosen, rewards, 0.0)) / jnp.maximum(n_chosen, 1)
    rew_rejected = jnp.sum(jnp.where(is_rejected, rewards, 0.0)) / jnp.maximum(n_rejected, 1)
    metrics = {
        "loss": loss,
        "z_ref": z_ref,
        "kl": kl,
        "rewards/chosen": rew_chosen,
        "rewards/rejected": rew_rejected,
        "rewards/margins": rew_chosen - rew_rejected,
        "count/chosen": n_chosen,
        "count/rejected": n_rejected,
        "count/valid": n_valid,
    }
    return loss, metrics


def alignment_loss(
    features: jax.Array, group_ids: jax.Array, valid: jax.Array | None = None, *, num_groups: int | None = None
) -> jax.Array:
    """Cross-lingual semantic alignment: mean over valid items of 1 - cos(h_i, mean of h over i's group).

    features (N,d) are bottleneck features of parallel prompts; group_ids (N,) ints in [0, num_groups)
    name the query (num_groups defaults to N, which is always enough). The group mean is taken over
    the valid items of that group (unnormalised features), and gradients flow through both h_i and
    the mean, so the term pulls every language of a query toward the others rather than toward a
    fixed target. Zero iff every valid item points the same way as its group mean.
    """
    h = features.astype(jnp.float32)
    n = h.shape[0]
    valid = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
    g = group_ids.astype(jnp.int32)
    k = n if num_groups is None else num_groups
    w = valid.astype(jnp.float32)
    sums = jax.ops.segment_sum(h * w[:, None], g, num_segments=k)
    counts = jax.ops.segment_sum(w, g, num_segments=k)
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    centre = means[g]
    eps = 1e-8  # guards zero vectors (padding rows) without changing non-degenerate cosines
    cos = jnp.sum(h * centre, -1) / (
        jnp.maximum(jnp.linalg.norm(h, axis=-1), eps) * jnp.maximum(jnp.linalg.norm(centre, axis=-1), eps)
    )
    return jnp.sum(jnp.where(valid, 1.0 - cos, 0.0)) / jnp.maximum(jnp.sum(w), 1.0)
