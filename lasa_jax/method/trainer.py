"""The Latent-KTO training step on a device mesh, and the reference model's log-probs.

* ``Trainer``: one jitted, sharded step (params and AdamW state sharded like the parameters,
  donated; batch split over data x fsdp; gradient accumulation by ``lax.scan``).
* ``reference_logps``: the frozen reference's log-probs for every item and every step's KL pairs,
  computed once before training (``config.align.reference = "precomputed"``); the alternative
  ``"per_step"`` recomputes them every step from a frozen copy of the initial params.

The stage that runs it (checkpoints, resume, metrics, export) is ``lasa_jax.stages.align``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from lasa_jax.infra import mesh as shd
from lasa_jax.infra.multihost import show_progress, to_host
from lasa_jax.method.kto import alignment_loss, completion_logps, kto_loss
from lasa_jax.method.kto_data import KTOBatches
from lasa_jax.model.checkpoint import flatten, unflatten

BATCH_AXES = ("data", "fsdp")
# Dense bf16 peak FLOP/s per chip, matched by substring of ``device.device_kind`` (first match).
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12),
    ("A10", 125e12), ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
)


def _decay_mask(params):
    """Weight decay on matrices only, not on norm scales or biases (the HF Trainer convention)."""
    return unflatten({k: not (k.endswith("scale") or k.endswith("_bias")) for k in flatten(params)})


def make_optimizer(acfg, total_steps: int):
    """clip_by_global_norm -> AdamW, and the learning-rate schedule (linear warm-up from 0, then
    cosine to 0 at ``total_steps``).

    The schedule is evaluated on the host and fed to the step as a scalar (AdamW's update is
    linear in the learning rate, so ``lr * adamw(1)`` is ``adamw(lr)``): the compiled step then
    does not depend on the learning rate or the run length, and a changed schedule or a longer
    run reuses the compilation cache.
    """
    warmup = min(int(acfg.warmup_steps), max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, float(acfg.learning_rate), warmup,
                                                  max(total_steps, warmup + 1), 0.0)
    tx = optax.chain(optax.clip_by_global_norm(float(acfg.grad_clip)),
                     optax.adamw(1.0, weight_decay=float(acfg.weight_decay), mask=_decay_mask))
    return tx, schedule


def _opt_shardings(abstract_opt_state, params, param_shardings, mesh):
    """AdamW moments mirror the params (same dict paths inside each optax state): shard them
    the same way; counters and anything else are replicated."""
    shardings, shapes = flatten(param_shardings), {k: v.shape for k, v in flatten(params).items()}

    def pick(path, leaf):
        key = "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        if key in shardings and tuple(leaf.shape) == tuple(shapes[key]):
            return shardings[key]
        return shd.replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def _batch_spec(name: str, ndim: int) -> P:
    if name.startswith("align_"):  # (N, ...): one batch, no micro-batches
        return P(BATCH_AXES, *([None] * (ndim - 1)))
    return P(None, BATCH_AXES, *([None] * (ndim - 2)))  # (A, b, ...)


def put_host_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Place a host batch (identical on every process) on the mesh, micro-batch rows split over
    data x fsdp."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        sharding = NamedSharding(mesh, _batch_spec(k, v.ndim))
        out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
    return out


def _tree_cast(tree, like):
    return jax.tree.map(lambda g, p: g.astype(p.dtype), tree, like)


class Trainer:
    """The jitted, sharded Latent-KTO step for one model, optimiser and batch layout."""

    def __init__(self, lm, acfg, *, total_steps: int, per_step_reference: bool,
                 lambda_align: float = 0.0, align_layer: int | None = None):
        if lm.mesh is None:
            raise ValueError("Trainer: the model must be placed on a mesh (load it with mesh=...)")
        # Only the module and mesh are kept: the params given here get donated to the step.
        self.mesh, self.module = lm.mesh, lm.module
        self.tx, self.schedule = make_optimizer(acfg, total_steps)
        self.per_step_reference = per_step_reference
        self.lambda_align = float(lambda_align)
        self.align_layer = align_layer
        self.kto_kw = dict(beta=float(acfg.beta), desirable_weight=float(acfg.desirable_weight),
                           undesirable_weight=float(acfg.undesirable_weight))
        self.param_shardings = lm.param_shardings
        abstract_opt = jax.eval_shape(self.tx.init, lm.params)
        self.opt_shardings = _opt_shardings(abstract_opt, lm.params, self.param_shardings, self.mesh)
        self._init_opt = jax.jit(self.tx.init, out_shardings=self.opt_shardings)
        self._logps = jax.jit(self._completion_logps)
        self._step = None
        self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lm.params))

    # --------------------------------------------------------------- pieces
    def _completion_logps(self, params, tokens, mask, loss_mask):
        logits = self.module.apply({"params": params}, tokens, mask).logits
        return completion_logps(logits, tokens, loss_mask)

    def _micro_logps(self, params, tokens, mask, loss_mask):
        """(A, b, T) -> (A, b), one micro-batch at a time (bounds activation memory)."""
        return jax.lax.map(lambda x: self._completion_logps(params, *x), (tokens, mask, loss_mask))

    def _align_loss(self, params, batch):
        out, _ = self.module.apply({"params": params}, batch["align_tokens"], batch["align_mask"],
                                   capture="last", return_logits=False, mutable=["intermediates"])
        h = out.hidden[self.align_layer]
        return alignment_loss(h, batch["align_groups"], batch["align_valid"],
                              num_groups=h.shape[0])

    def _train_step(self, params, opt_state, batch, lr, ref_params=None):
        f32 = jnp.float32
        # The KL pairs only set the reference point z_ref, which carries no gradient (as in TRL).
        pol_kl = jax.lax.stop_gradient(
            self._micro_logps(params, batch["kl_tokens"], batch["kl_mask"], batch["kl_loss_mask"]))
        if ref_params is not None:
            ref = self._micro_logps(ref_params, batch["tokens"], batch["mask"], batch["loss_mask"])
            ref_kl = self._micro_logps(ref_params, batch["kl_tokens"], batch["kl_mask"], batch["kl_loss_mask"])
        else:
            ref, ref_kl = batch["ref_logps"], batch["ref_kl_logps"]
        ref, ref_kl = jax.lax.stop_gradient(ref), jax.lax.stop_gradient(ref_kl)
        valid = batch["valid"]
        n_valid = jnp.maximum(jnp.sum(valid), 1).astype(f32)
        kl_global = jnp.sum(jnp.where(valid, pol_kl - ref_kl, 0.0)) / n_valid

        def micro_loss(p, mb):
            logps = self._completion_logps(p, mb["tokens"], mb["mask"], mb["loss_mask"])
            # Feeding the global KL mean as every item's KL makes kto_loss use the global-batch
            # z_ref; weighting by the micro-batch's share of valid items makes the micro losses
            # sum to the global-batch loss, so accumulation changes nothing.
            fill = jnp.full_like(logps, kl_global)
            loss, _ = kto_loss(logps, mb["ref"], fill, jnp.zeros_like(fill), mb["desirable"],
                               valid=mb["valid"], **self.kto_kw)
            return loss * jnp.sum(mb["valid"]) / n_valid, logps

        def body(acc, mb):
            (_, logps), g = jax.value_and_grad(micro_loss, has_aux=True)(params, mb)
            return jax.tree.map(lambda a, b: a + b.astype(f32), acc, g), logps

        micro = {"tokens": batch["tokens"], "mask": batch["mask"], "loss_mask": batch["loss_mask"],
                 "ref": ref, "desirable": batch["desirable"], "valid": valid}
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, f32), params)
        grads, pol = jax.lax.scan(body, zeros, micro)
        flat = lambda x: x.reshape(-1)
        kto, metrics = kto_loss(flat(pol), flat(ref), flat(pol_kl), flat(ref_kl), flat(batch["desirable"]),
                                valid=flat(valid), **self.kto_kw)
        align = jnp.zeros((), f32)
        if self.lambda_align > 0:
            align, g_align = jax.value_and_grad(self._align_loss)(params, batch)
            grads = jax.tree.map(lambda a, b: a + self.lambda_align * b.astype(f32), grads, g_align)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(_tree_cast(grads, params), opt_state, params)
        params = optax.apply_updates(params, jax.tree.map(lambda u: lr.astype(u.dtype) * u, updates))
        finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
        metrics = {**metrics, "loss": kto + self.lambda_align * align, "kto_loss": kto, "align_loss": align,
                   "grad_norm": grad_norm, "params_finite": finite}
        return params, opt_state, metrics

    def _compile(self, batch):
        bsh = {k: NamedSharding(self.mesh, _batch_spec(k, v.ndim)) for k, v in batch.items()}
        rep = shd.replicated(self.mesh)
        in_sh = (self.param_shardings, self.opt_shardings, bsh, rep)
        fn = self._train_step
        if self.per_step_reference:
            in_sh = in_sh + (self.param_shardings,)
        else:
            fn = lambda p, o, b, lr: self._train_step(p, o, b, lr)
        return jax.jit(fn, in_shardings=in_sh, out_shardings=(self.param_shardings, self.opt_shardings, rep),
                       donate_argnums=(0, 1))

    # --------------------------------------------------------------- public
    def init_opt_state(self, params):
        return self._init_opt(params)

    def step(self, params, opt_state, host_batch: dict[str, np.ndarray], step: int, ref_params=None):
        """Optimiser step number ``step`` (0-based, sets the learning rate). Consumes (donates)
        ``params`` and ``opt_state``."""
        if self.per_step_reference != (ref_params is not None):
            raise ValueError("Trainer.step: pass ref_params exactly when the reference is per-step")
        if not self.per_step_reference and "ref_logps" not in host_batch:
            raise ValueError("Trainer.step: precomputed reference log-probs missing from the batch")
        batch = put_host_batch(host_batch, self.mesh)
        if self._step is None:
            self._step = self._compile(batch)
        lr = np.asarray(float(self.schedule(step)), np.float32)
        args = (params, opt_state, batch, lr) + ((ref_params,) if self.per_step_reference else ())
        return self._step(*args)

    def logps(self, params, tokens, mask, loss_mask) -> np.ndarray:
        """(B,) completion log-probs of one (B, T) batch; B a multiple of the batch-parallel size."""
        placed = shd.put_batch({"t": tokens, "m": mask, "l": loss_mask}, self.mesh)
        return to_host(self._logps(params, placed["t"], placed["m"], placed["l"]))


def reference_logps(trainer: Trainer, ref_params, data: KTOBatches, *, progress: bool = False):
    """The reference model's log-probs: (N,) for every item and (total_steps, B) for every step's
    KL pairs, in batches of the training batch size (one compiled shape)."""
    from tqdm.auto import tqdm
    n, B = len(data.items), data.batch_size
    items = np.zeros(n, np.float32)
    groups = [np.arange(i, i + B) % n for i in range(0, n, B)]
    kl = np.zeros((data.total_steps, B), np.float32)
    with tqdm(total=len(groups) + data.total_steps, desc="reference log-probs",
              disable=not show_progress(progress), leave=False) as bar:
        for idx in groups:
            a = data.main_arrays(idx)
            items[idx] = trainer.logps(ref_params, a["tokens"], a["attention_mask"], a["loss_mask"])
            bar.update()
        for s in range(data.total_steps):
            a = data.kl_arrays(data.indices(s))
            kl[s] = trainer.logps(ref_params, a["tokens"], a["attention_mask"], a["loss_mask"])
            bar.update()
    return items, kl


def peak_flops(devices=None) -> float | None:
    devices = devices or jax.devices()
    kind = devices[0].device_kind
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return flops * len(devices)
    return None
