"""The Latent-KTO training step on a device mesh, and the reference model's log-probs.

* ``Trainer``: one jitted, sharded step (master weights and AdamW state sharded like the
  parameters, donated; batch split over data x fsdp; gradient accumulation by ``lax.scan``).
  Mixed precision as large-model stacks do it: the trainer owns *master* weights in
  ``align.master_dtype`` (float32 by default) and AdamW moments of the same dtype; each step casts
  the masters to the compute dtype (``model.dtype``, bf16 on accelerators) once, runs forward and
  backward on that copy, accumulates micro-batch gradients in float32 and applies the update to
  the masters. A bf16 weight cannot take an update of lr 1e-6 (a bf16 step near 0.02 is 1.2e-4),
  a float32 one can.
* ``Trainer.lower``: the same step lowered for shapes only (``jax.ShapeDtypeStruct``), so a
  benchmark or test can compile it and read XLA's memory analysis without allocating weights.
* ``reference_logps``: the frozen reference's log-probs for every item and every step's KL pairs,
  computed once before training (``config.align.reference = "precomputed"``); the alternative
  ``"per_step"`` recomputes them every step from a frozen copy of the initial params.

The stage that runs it (checkpoints, resume, metrics, export) is ``lasa_jax.stages.align``.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from lasa_jax.infra import mesh as shd
from lasa_jax.infra.multihost import show_progress, to_host
from lasa_jax.method.kto import alignment_loss, item_logps, kto_loss
from lasa_jax.method.kto_data import KTOBatches, place_rows
from lasa_jax.model.checkpoint import flatten, unflatten
from lasa_jax.model.lm import LanguageModel, as_dtype, round_up
from lasa_jax.model.packing import pack
from lasa_jax.model.transformer import param_specs

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
    if ndim == 1:  # (B,) per-item values: tiny, and every row's device may hold any item
        return P()
    return P(None, BATCH_AXES, *([None] * (ndim - 2)))  # (A, rows, T)


def put_host_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Place a host batch (identical on every process) on the mesh, packed rows split over
    data x fsdp, per-item values replicated."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        sharding = NamedSharding(mesh, _batch_spec(k, v.ndim))
        out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
    return out


def _tree_cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype), tree)


def batch_shapes(batch_size: int, grad_accum: int, length: int, *, rows: int | None = None,
                 kl_rows: int | None = None, precomputed: bool = True, align_rows: int = 0,
                 align_length: int = 0) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one host batch as ``KTOBatches.host_batch`` (+ ``AlignBatches``) builds
    it: (grad_accum, rows, length) packed arrays, (batch_size,) per-item values, and
    (align_rows, align_length) for the alignment term's parallel prompts when ``align_rows``.
    ``rows`` / ``kl_rows`` default to one item per row (batch_size / grad_accum): the most a
    batch can need, which is what a memory plan made before the data is known must assume."""
    a = grad_accum
    rows = rows or batch_size // grad_accum
    kl_rows = kl_rows or batch_size // grad_accum
    S = jax.ShapeDtypeStruct
    out = {}
    for prefix, r in (("", rows), ("kl_", kl_rows)):
        out.update({prefix + "tokens": S((a, r, length), jnp.int32), prefix + "items": S((a, r, length), jnp.int32),
                    prefix + "loss_mask": S((a, r, length), jnp.bool_)})
    out.update(desirable=S((batch_size,), jnp.bool_), valid=S((batch_size,), jnp.bool_))
    if precomputed:
        out.update(ref_logps=S((batch_size,), jnp.float32), ref_kl_logps=S((batch_size,), jnp.float32))
    if align_rows:
        out.update(align_tokens=S((align_rows, align_length), jnp.int32),
                   align_mask=S((align_rows, align_length), jnp.bool_),
                   align_groups=S((align_rows,), jnp.int32), align_valid=S((align_rows,), jnp.bool_))
    return out


def abstract_model(cfg, mesh, *, dtype: str = "bfloat16", param_dtype: str = "bfloat16",
                   remat: str = "none", attention_impl: str | None = None) -> LanguageModel:
    """A ``LanguageModel`` whose params are ``jax.ShapeDtypeStruct`` leaves: enough to build a
    ``Trainer`` and ``lower`` its step for a model of any size without allocating it."""
    params = unflatten({path: jax.ShapeDtypeStruct(shape, as_dtype(param_dtype))
                        for path, (shape, _) in param_specs(cfg).items()})
    return LanguageModel(cfg, params, mesh=mesh, dtype=dtype, param_dtype=param_dtype, remat=remat,
                         attention_impl=attention_impl)


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


class Trainer:
    """The jitted, sharded Latent-KTO step for one model, optimiser and batch layout.

    State: float32 (``acfg.master_dtype``) master weights and AdamW moments, both sharded like the
    model's parameters; the model's own params (``model.param_dtype``) are only the start point
    (``init_state``) and, for ``reference = "per_step"``, the frozen reference."""

    def __init__(self, lm, acfg, *, total_steps: int, per_step_reference: bool,
                 lambda_align: float = 0.0, align_layer: int | None = None):
        if lm.mesh is None:
            raise ValueError("Trainer: the model must be placed on a mesh (load it with mesh=...)")
        # Only the module, mesh and shapes are kept: the trainer owns its masters, and the
        # model's params may be abstract (``abstract_model``).
        self.mesh, self.module = lm.mesh, lm.module
        self.compute_dtype, self.reference_dtype = jnp.dtype(lm.dtype), jnp.dtype(lm.param_dtype)
        self.master_dtype = jnp.dtype(as_dtype(acfg.master_dtype))
        self.tx, self.schedule = make_optimizer(acfg, total_steps)
        self.per_step_reference = per_step_reference
        self.lambda_align = float(lambda_align)
        self.align_layer = align_layer
        self.kto_kw = dict(beta=float(acfg.beta), desirable_weight=float(acfg.desirable_weight),
                           undesirable_weight=float(acfg.undesirable_weight))
        self.param_shardings = lm.param_shardings
        shaped = lambda dtype: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype, sharding=s),
                                            lm.params, self.param_shardings)
        self.abstract_masters = shaped(self.master_dtype)
        self.abstract_reference = shaped(self.reference_dtype)
        abstract_opt = jax.eval_shape(self.tx.init, self.abstract_masters)
        self.opt_shardings = _opt_shardings(abstract_opt, lm.params, self.param_shardings, self.mesh)
        self.abstract_opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                               abstract_opt, self.opt_shardings)
        # Always a fresh buffer, even when the dtypes agree: the step donates the masters, and
        # the params they start from may still serve as the frozen reference.
        self._masters = jax.jit(lambda p: jax.tree.map(lambda x: jnp.array(x, self.master_dtype, copy=True), p),
                                out_shardings=self.param_shardings)
        self._init_opt = jax.jit(self.tx.init, out_shardings=self.opt_shardings)
        self._logps = jax.jit(self._item_logps, static_argnums=4)
        self._steps: dict = {}
        self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lm.params))

    @property
    def precision(self) -> dict[str, str]:
        """The mixed-precision policy, as recorded in metrics and summaries."""
        return {"master": _dtype_name(self.master_dtype), "optimizer_state": _dtype_name(self.master_dtype),
                "compute": _dtype_name(self.compute_dtype), "gradient_accumulation": "float32",
                "reference": _dtype_name(self.reference_dtype)}

    # --------------------------------------------------------------- pieces
    def _item_logps(self, params, tokens, items, loss_mask, num_items: int):
        """Packed rows (rows, T) -> (num_items,) completion log-probs (``kto_data.KTOBatches``)."""
        logits = self.module.apply({"params": params}, tokens, segment_ids=items).logits
        return item_logps(logits, tokens, items, loss_mask, num_items)

    def _micro_logps(self, params, tokens, items, loss_mask, num_items: int):
        """(A, rows, T) -> (num_items,), one micro-batch at a time (bounds activation memory);
        each item lies in one micro-batch, so the per-micro sums add up to its log-prob."""
        per_micro = jax.lax.map(lambda x: self._item_logps(params, *x, num_items), (tokens, items, loss_mask))
        return jnp.sum(per_micro, axis=0)

    def _align_loss(self, params, batch):
        out, _ = self.module.apply({"params": params}, batch["align_tokens"], batch["align_mask"],
                                   capture="last", return_logits=False, mutable=["intermediates"])
        h = out.hidden[self.align_layer]
        return alignment_loss(h, batch["align_groups"], batch["align_valid"],
                              num_groups=h.shape[0])

    def _train_step(self, masters, opt_state, batch, lr, ref_params=None):
        f32 = jnp.float32
        # The one place the masters become compute weights: forward, backward, KL pairs and the
        # alignment term all run on this copy; gradients are taken with respect to it.
        params = _tree_cast(masters, self.compute_dtype)
        # The KL pairs only set the reference point z_ref, which carries no gradient (as in TRL).
        n = batch["desirable"].shape[0]
        main = (batch["tokens"], batch["items"], batch["loss_mask"])
        kl = (batch["kl_tokens"], batch["kl_items"], batch["kl_loss_mask"])
        pol_kl = jax.lax.stop_gradient(self._micro_logps(params, *kl, n))
        if ref_params is not None:
            ref, ref_kl = self._micro_logps(ref_params, *main, n), self._micro_logps(ref_params, *kl, n)
        else:
            ref, ref_kl = batch["ref_logps"], batch["ref_kl_logps"]
        ref, ref_kl = jax.lax.stop_gradient(ref), jax.lax.stop_gradient(ref_kl)
        valid = batch["valid"]
        n_valid = jnp.maximum(jnp.sum(valid), 1).astype(f32)
        kl_global = jnp.sum(jnp.where(valid, pol_kl - ref_kl, 0.0)) / n_valid

        def micro_loss(p, mb):
            # (n,) log-probs, 0 for the items of other micro-batches, which `mine` leaves out.
            logps = self._item_logps(p, mb["tokens"], mb["items"], mb["loss_mask"], n)
            mine = valid & jnp.zeros(n + 1, bool).at[mb["items"].reshape(-1)].set(True)[1:]
            # Feeding the global KL mean as every item's KL makes kto_loss use the global-batch
            # z_ref; weighting by the micro-batch's share of valid items makes the micro losses
            # sum to the global-batch loss, so accumulation changes nothing.
            fill = jnp.full_like(logps, kl_global)
            loss, _ = kto_loss(logps, ref, fill, jnp.zeros_like(fill), batch["desirable"],
                               valid=mine, **self.kto_kw)
            return loss * jnp.sum(mine) / n_valid, logps

        def grads_of(mb):  # gradients in the compute dtype, handed on as float32
            (_, logps), g = jax.value_and_grad(micro_loss, has_aux=True)(params, mb)
            return jax.tree.map(lambda x: x.astype(f32), g), logps

        micro = {"tokens": batch["tokens"], "items": batch["items"], "loss_mask": batch["loss_mask"]}
        if batch["tokens"].shape[0] == 1:
            # One micro-batch: no accumulator buffer, its gradients go to the update in float32.
            grads, pol = grads_of(jax.tree.map(lambda x: x[0], micro))
        else:
            def body(acc, mb):  # the float32 sum over micro-batches
                g, logps = grads_of(mb)
                return (jax.tree.map(jnp.add, acc[0], g), acc[1] + logps), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, f32), masters)
            (grads, pol), _ = jax.lax.scan(body, (zeros, jnp.zeros((n,), f32)), micro)
        kto, metrics = kto_loss(pol, ref, pol_kl, ref_kl, batch["desirable"], valid=valid, **self.kto_kw)
        align = jnp.zeros((), f32)
        if self.lambda_align > 0:
            align, g_align = jax.value_and_grad(self._align_loss)(params, batch)
            grads = jax.tree.map(lambda a, b: a + self.lambda_align * b.astype(f32), grads, g_align)
        grad_norm = optax.tree.norm(grads)
        # AdamW and the update in the master dtype: lr * u of 1e-6 survives in float32 weights.
        updates, opt_state = self.tx.update(_tree_cast(grads, self.master_dtype), opt_state, masters)
        masters = optax.apply_updates(masters, jax.tree.map(lambda u: lr.astype(u.dtype) * u, updates))
        finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(masters)]))
        metrics = {**metrics, "loss": kto + self.lambda_align * align, "kto_loss": kto, "align_loss": align,
                   "grad_norm": grad_norm, "params_finite": finite}
        return masters, opt_state, metrics

    def _batch_shardings(self, batch) -> dict:
        return {k: NamedSharding(self.mesh, _batch_spec(k, len(v.shape))) for k, v in batch.items()}

    def step_fn(self, batch):
        """The jitted step for batches shaped like ``batch`` (arrays or ShapeDtypeStructs):
        ``(masters, opt_state, batch, lr[, ref_params]) -> (masters, opt_state, metrics)``,
        masters and optimizer state donated."""
        key = tuple(sorted((k, len(v.shape)) for k, v in batch.items()))
        if key not in self._steps:
            rep = shd.replicated(self.mesh)
            in_sh = (self.param_shardings, self.opt_shardings, self._batch_shardings(batch), rep)
            fn = self._train_step
            if self.per_step_reference:
                in_sh = in_sh + (self.param_shardings,)
            else:
                fn = lambda p, o, b, lr: self._train_step(p, o, b, lr)
            self._steps[key] = jax.jit(fn, in_shardings=in_sh,
                                       out_shardings=(self.param_shardings, self.opt_shardings, rep),
                                       donate_argnums=(0, 1))
        return self._steps[key]

    def abstract_inputs(self, batch: dict) -> tuple:
        """ShapeDtypeStructs (with shardings) of every argument of ``step_fn(batch)``."""
        shardings = self._batch_shardings(batch)
        b = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in batch.items()}
        lr = jax.ShapeDtypeStruct((), jnp.float32, sharding=shd.replicated(self.mesh))
        args = (self.abstract_masters, self.abstract_opt_state, b, lr)
        return args + ((self.abstract_reference,) if self.per_step_reference else ())

    def lower(self, batch: dict):
        """The step lowered for shapes only; ``.compile().memory_analysis()`` is XLA's account of
        its per-device memory. Nothing is allocated."""
        return self.step_fn(batch).lower(*self.abstract_inputs(batch))

    # --------------------------------------------------------------- public
    def init_state(self, params):
        """Master weights (a fresh copy of ``params`` in the master dtype, sharded like them) and
        the optimizer state for them. ``params`` are not consumed."""
        masters = self._masters(params)
        return masters, self._init_opt(masters)

    def step(self, masters, opt_state, host_batch: dict[str, np.ndarray], step: int, ref_params=None):
        """Optimiser step number ``step`` (0-based, sets the learning rate). Consumes (donates)
        ``masters`` and ``opt_state``."""
        if self.per_step_reference != (ref_params is not None):
            raise ValueError("Trainer.step: pass ref_params exactly when the reference is per-step")
        if not self.per_step_reference and "ref_logps" not in host_batch:
            raise ValueError("Trainer.step: precomputed reference log-probs missing from the batch")
        batch = put_host_batch(host_batch, self.mesh)
        lr = np.asarray(float(self.schedule(step)), np.float32)
        args = (masters, opt_state, batch, lr) + ((ref_params,) if self.per_step_reference else ())
        return self.step_fn(batch)(*args)

    def logps(self, params, tokens, items, loss_mask, num_items: int) -> np.ndarray:
        """(num_items,) completion log-probs of packed rows (rows, T) (``item_logps``); rows a
        multiple of the batch-parallel size."""
        placed = shd.put_batch({"t": tokens, "i": items, "l": loss_mask}, self.mesh)
        return to_host(self._logps(params, placed["t"], placed["i"], placed["l"], int(num_items)))


def reference_batches(data: KTOBatches, steps: Sequence[int], row_multiple: int):
    """What the reference pass computes: the items of ``steps`` (all items when ``steps`` is the
    whole run) followed by every step's KL pairs, as (item indices, encoded sequences, batches
    packed by ``packing.pack`` into rows of the training batch size)."""
    everything = len(steps) == data.total_steps
    wanted = list(range(len(data.items))) if everything else sorted({int(i) for s in steps for i in data.indices(s)})
    encoded = [data.encoded[i] for i in wanted]
    for s in steps:
        encoded += data.kl_encoded(data.indices(s))
    encoded = [{k: e[k][:data.length] for k in ("input_ids", "loss_mask")} for e in encoded]
    batches = pack([e["input_ids"] for e in encoded], rows=round_up(data.batch_size, row_multiple),
                   pad_id=data.pad_id, row_multiple=row_multiple)
    return wanted, encoded, batches


def reference_logps(trainer: Trainer, ref_params, data: KTOBatches, *, steps: Sequence[int] | None = None,
                    progress: bool = False):
    """The reference model's log-probs: (N,) for every item and (total_steps, B) for every step's
    KL pairs (only the items and pairs of ``steps`` when given; the rest stay 0). All sequences
    are packed together (``reference_batches``), so the pass computes almost no padding and
    compiles a handful of shapes."""
    from tqdm.auto import tqdm
    steps = range(data.total_steps) if steps is None else list(steps)
    wanted, encoded, batches = reference_batches(data, steps, shd.batch_multiple(trainer.mesh))
    out = np.zeros(len(encoded), np.float32)
    for b in tqdm(batches, desc="reference log-probs", disable=not show_progress(progress), leave=False):
        # The batch's rows as the step lays them out, items numbered in b.items' (row, slot) order.
        placed = [[] for _ in range(b.tokens.shape[0])]
        for j, (_, r, _) in enumerate(b.items):
            placed[r].append(j)
        rows = place_rows([encoded[i] for i, _, _ in b.items], placed, *b.tokens.shape, data.pad_id)
        got = trainer.logps(ref_params, rows["tokens"], rows["items"], rows["loss_mask"], b.last.size)
        out[[i for i, _, _ in b.items]] = got[:len(b.items)]
    items = np.zeros(len(data.items), np.float32)
    items[wanted] = out[:len(wanted)]
    kl = np.zeros((data.total_steps, data.batch_size), np.float32)
    kl[list(steps)] = out[len(wanted):].reshape(len(steps), data.batch_size)
    return items, kl


def peak_flops(devices=None) -> float | None:
    devices = devices or jax.devices()
    kind = devices[0].device_kind
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return flops * len(devices)
    return None
