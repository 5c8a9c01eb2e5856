"""Stage 3 loop: Latent-KTO training on a device mesh, with checkpoints, resume, metrics, export.

The pure pieces live elsewhere (losses in ``kto``, items/tokens/order in ``data.kto_data``); this
module turns them into a run:

* ``KTOBatches``: items tokenised once, a fixed (B, T) batch per global step; which items a step
  sees is a pure function of the step, so a resumed run replays the same order.
* ``Trainer``: one jitted, sharded step (params and AdamW state sharded like the parameters,
  donated; batch split over data x fsdp; gradient accumulation by ``lax.scan``).
* ``reference_logps``: the frozen reference's log-probs for every item and every step's KL pairs,
  computed once and cached in ``align/`` (``config.align.reference = "precomputed"``); the
  alternative ``"per_step"`` recomputes them every step from a frozen copy of the initial params.
* ``run_align``: the stage; Orbax checkpoints with resume, ``metrics.jsonl``, TensorBoard,
  export of the policy as an HF checkpoint in ``align/hf``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from lasa_jax import distributed
from lasa_jax import sharding as shd
from lasa_jax.atomic import atomic_write, atomic_write_text
from lasa_jax.data.kto_data import (DEFAULT_SOURCE_PROBS, REFUSAL_PREFIX, KTOItem, collate, encode_item,
                                    epoch_order, kl_pairs, pairs_to_items)
from lasa_jax.kto import alignment_loss, completion_logps, kto_loss

log = logging.getLogger("lasa_jax")

BATCH_AXES = ("data", "fsdp")
# Dense bf16 peak FLOP/s per chip, matched by substring of ``device.device_kind`` (first match).
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12),
    ("A10", 125e12), ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
)


class NonFiniteLoss(FloatingPointError):
    pass


# ============================================================================ data

def parse_source_probs(text: str) -> dict[str, float]:
    """``"safety=0.5,general=0"`` -> {...}; sources the spec knows keep their defaults."""
    probs = dict(DEFAULT_SOURCE_PROBS)
    for part in str(text).split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        try:
            p = float(value)
        except ValueError:
            p = -1.0
        if not sep or not name.strip() or not 0.0 <= p <= 1.0:
            raise ValueError(f"config.align.source_probs: {part.strip()!r} is not SOURCE=PROBABILITY in [0, 1]")
        probs[name.strip()] = p
    return probs


def ssi_verdicts(lm, prompts: Sequence[str], ssi_dir: str, *, batch_size: int = 16,
                 progress: bool = False) -> dict[str, bool]:
    """The SSI's verdict on each prompt's feature under ``lm`` (the base model), as inference reads it."""
    from lasa_jax.ssi import load_for_model, score_prompts
    unique = sorted(set(prompts))
    _, verdicts = score_prompts(lm, load_for_model(lm, ssi_dir), unique, batch_size, progress)
    return dict(zip(unique, (bool(v) for v in verdicts)))


def make_items(pairs, acfg, *, seed: int, verdicts=None) -> list[KTOItem]:
    return pairs_to_items(pairs, z_mode=acfg.z_mode, source_probs=parse_source_probs(acfg.source_probs),
                          seed=seed, ssi_verdicts=verdicts)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class KTOBatches:
    """Fixed-shape batches of KTO items, a pure function of the global step.

    Step s of an epoch of ``steps_per_epoch = ceil(N / B)`` steps takes positions s*B ... s*B+B-1 of
    ``epoch_order(N, epoch, seed)``, wrapping to the epoch's start to fill the last batch (every
    row is a real item, so every batch has the same shape and no padding items). Arrays come as
    (grad_accum, B / grad_accum, ...): micro-batch a holds items a*b ... a*b+b-1 of the global
    batch, and the KL pairs rotate over the whole global batch (TRL's rotation).
    """

    def __init__(self, items: Sequence[KTOItem], tokenizer, *, batch_size: int, grad_accum: int = 1,
                 seed: int = 0, epochs: int = 1, max_steps: int = 0, max_length: int = 512,
                 max_prompt_length: int = 384, pad_id: int = 0, bucket: int = 16):
        if len(items) < 2:
            raise ValueError(f"KTO data: need at least 2 items (1 pair), got {len(items)}")
        if batch_size < 2:
            raise ValueError("config.align.batch_size must be >= 2: the KTO reference point needs a batch")
        if grad_accum < 1 or batch_size % grad_accum:
            raise ValueError(f"config.align.batch_size={batch_size} is not divisible by grad_accum={grad_accum}")
        self.items, self.tokenizer = list(items), tokenizer
        self.batch_size, self.grad_accum, self.seed, self.pad_id = batch_size, grad_accum, seed, pad_id
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.encoded = [self._encode(it) for it in self.items]
        prompt_len = max(e["loss_mask"].index(1) for e in self.encoded)
        completion_len = max(len(e["loss_mask"]) - e["loss_mask"].index(1) for e in self.encoded)
        longest = max(len(e["input_ids"]) for e in self.encoded)
        # A KL pair is roughly (longest prompt part) + (longest completion); one width for all
        # steps keeps the step compiled once. A KL pair longer than that (BPE merges at the join)
        # loses the end of its completion, which only perturbs the batch's reference point.
        self.length = min(_round_up(max(longest, prompt_len + completion_len), bucket), max(max_length, longest))
        self.steps_per_epoch = -(-len(self.items) // batch_size)
        self.total_steps = int(max_steps) if max_steps else int(epochs) * self.steps_per_epoch
        if self.total_steps < 1:
            raise ValueError("config.align: epochs and max_steps give no training step")
        self.ref_logps: np.ndarray | None = None  # (N,) once the reference is precomputed
        self.ref_kl_logps: np.ndarray | None = None  # (total_steps, B)

    def _encode(self, item: KTOItem) -> dict:
        return encode_item(self.tokenizer, item.prompt, item.completion,
                           prefix=REFUSAL_PREFIX if item.z else None,
                           max_length=self.max_length, max_prompt_length=self.max_prompt_length)

    @property
    def key(self) -> str:
        """Digest of everything the batches depend on: tokens, labels, order."""
        toks = np.concatenate([np.asarray(e["input_ids"], np.int64) for e in self.encoded])
        masks = np.concatenate([np.asarray(e["loss_mask"], np.int8) for e in self.encoded])
        lens = np.asarray([len(e["input_ids"]) for e in self.encoded], np.int64)
        flags = np.asarray([[it.desirable, it.z] for it in self.items], np.int8)
        return _digest(toks, masks, lens, flags, [self.batch_size, self.grad_accum, self.seed,
                                                   self.total_steps, self.length])

    def position(self, step: int) -> tuple[int, int]:
        return divmod(int(step), self.steps_per_epoch)

    def indices(self, step: int) -> np.ndarray:
        epoch, k = self.position(step)
        order = epoch_order(len(self.items), epoch, self.seed)
        return order[(k * self.batch_size + np.arange(self.batch_size)) % len(self.items)]

    def _collate(self, encoded) -> dict[str, np.ndarray]:
        encoded = [e if len(e["input_ids"]) <= self.length else
                   {k: v[:self.length] for k, v in e.items()} for e in encoded]
        out = collate(encoded, self.pad_id, pad_to=self.length)
        out.pop("positions")  # the model derives the same positions from the mask
        return out

    def main_arrays(self, idx: Sequence[int]) -> dict[str, np.ndarray]:
        return self._collate([self.encoded[i] for i in idx])

    def kl_arrays(self, idx: Sequence[int]) -> dict[str, np.ndarray]:
        return self._collate([self._encode(it) for it in kl_pairs([self.items[i] for i in idx])])

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        idx = self.indices(step)
        main, kl = self.main_arrays(idx), self.kl_arrays(idx)
        batch = {"tokens": main["tokens"], "mask": main["attention_mask"], "loss_mask": main["loss_mask"],
                 "kl_tokens": kl["tokens"], "kl_mask": kl["attention_mask"], "kl_loss_mask": kl["loss_mask"],
                 "desirable": np.asarray([self.items[i].desirable for i in idx]),
                 "valid": np.ones(len(idx), bool)}
        if self.ref_logps is not None:
            batch["ref_logps"] = self.ref_logps[idx].astype(np.float32)
            batch["ref_kl_logps"] = self.ref_kl_logps[step].astype(np.float32)
        a = self.grad_accum
        return {k: v.reshape(a, v.shape[0] // a, *v.shape[1:]) for k, v in batch.items()}


class AlignBatches:
    """Parallel prompts for the alignment term: ``queries_per_step`` queries (every language of
    each) per step, queries drawn in a per-pass shuffled order that is a function of the step."""

    def __init__(self, lm, queries, *, queries_per_step: int, seed: int, chat_template: bool = False,
                 batch_multiple: int = 1):
        if len(queries) < 1 or queries_per_step < 1:
            raise ValueError("alignment term: needs parallel queries and align_batch_queries >= 1")
        self.q = min(int(queries_per_step), len(queries))
        self.seed, self.num = seed, len(queries)
        self.rows = [[] for _ in queries]
        texts = []
        for qi, query in enumerate(queries):
            for text in query.texts.values():
                self.rows[qi].append(len(texts))
                texts.append(text)
        self.tokens, self.mask = lm.encode(texts, chat_template=chat_template, batch_multiple=1)
        per_step = sum(sorted(len(r) for r in self.rows)[-self.q:])
        self.width = _round_up(per_step, batch_multiple)

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        picks = []
        for j in range(self.q):
            pos = step * self.q + j
            picks.append(int(epoch_order(self.num, pos // self.num, self.seed + 1)[pos % self.num]))
        rows = [(g, r) for g, qi in enumerate(picks) for r in self.rows[qi]]
        n, T = self.width, self.tokens.shape[1]
        tokens, mask = np.zeros((n, T), np.int32), np.zeros((n, T), bool)
        groups, valid = np.zeros(n, np.int32), np.zeros(n, bool)
        mask[:, 0] = True  # filler rows hold one real token, so no row is empty
        for i, (g, r) in enumerate(rows):
            tokens[i], mask[i], groups[i], valid[i] = self.tokens[r], self.mask[r], g, True
        return {"align_tokens": tokens, "align_mask": mask, "align_groups": groups, "align_valid": valid}


# ============================================================================ step

def _decay_mask(params):
    """Weight decay on matrices only, not on norm scales or biases (the HF Trainer convention)."""
    from lasa_jax.models.checkpoint import flatten, unflatten
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
    from lasa_jax.models.checkpoint import flatten
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
        self.param_shardings = shd.tree_shardings(lm.params, self.mesh)
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
        return np.asarray(self._logps(params, placed["t"], placed["m"], placed["l"]))


def reference_logps(trainer: Trainer, ref_params, data: KTOBatches, *, progress: bool = False):
    """The reference model's log-probs: (N,) for every item and (total_steps, B) for every step's
    KL pairs, in batches of the training batch size (one compiled shape)."""
    from tqdm.auto import tqdm
    n, B = len(data.items), data.batch_size
    items = np.zeros(n, np.float32)
    groups = [np.arange(i, i + B) % n for i in range(0, n, B)]
    kl = np.zeros((data.total_steps, B), np.float32)
    with tqdm(total=len(groups) + data.total_steps, desc="reference log-probs", disable=not progress,
              leave=False) as bar:
        for idx in groups:
            a = data.main_arrays(idx)
            items[idx] = trainer.logps(ref_params, a["tokens"], a["attention_mask"], a["loss_mask"])
            bar.update()
        for s in range(data.total_steps):
            a = data.kl_arrays(data.indices(s))
            kl[s] = trainer.logps(ref_params, a["tokens"], a["attention_mask"], a["loss_mask"])
            bar.update()
    return items, kl


def cached_reference(trainer: Trainer, ref_params, data: KTOBatches, out_dir: str, model_key: str,
                     progress: bool = False) -> str:
    """Fill ``data.ref_*`` from ``out_dir/reference-<hash>.npz`` (data + model), computing it first
    if absent."""
    key = _digest(data.key, model_key)
    path = os.path.join(out_dir, f"reference-{key}.npz")
    if os.path.exists(path):
        with np.load(path) as z:
            data.ref_logps, data.ref_kl_logps = z["items"], z["kl"]
        return path
    items, kl = reference_logps(trainer, ref_params, data, progress=progress)
    if distributed.is_primary():
        def write(tmp):
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
                np.savez(f, items=items, kl=kl)
        atomic_write(path, write)
    data.ref_logps, data.ref_kl_logps = items, kl
    return path


# ============================================================================ run management

def peak_flops(devices=None) -> float | None:
    devices = devices or jax.devices()
    kind = devices[0].device_kind
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return flops * len(devices)
    return None


def _checkpoint_manager(directory: str, acfg):
    import orbax.checkpoint as ocp
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(int(acfg.keep_checkpoints), 1), create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=bool(acfg.async_checkpoints))
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def _save(mngr, step: int, state: dict, meta: dict) -> None:
    import orbax.checkpoint as ocp
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(meta)), force=True)


def _restore(mngr, step: int, abstract_state: dict) -> tuple[dict, dict]:
    import orbax.checkpoint as ocp
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                     meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]


class _MetricsLog:
    """metrics.jsonl (+ TensorBoard) on process 0; a resumed run drops lines past its step."""

    def __init__(self, out_dir: str, start_step: int, tensorboard: bool):
        self.primary = distributed.is_primary()
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.writer = None
        if not self.primary:
            return
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
        with open(self.path, "w") as f:
            f.writelines(kept)
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def write(self, row: dict) -> None:
        if not self.primary:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.writer.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _load_queries(run):
    from lasa_jax.data.readers import read_parallel
    from lasa_jax.pipeline import languages_of, resolve_data_path
    return read_parallel(resolve_data_path(run.config.data.parallel_prompts, run.config.model.path),
                         languages_of(run.config))


def _row(step: int, data: KTOBatches, m: dict, lr: float, tokens: int, seconds: float, peak,
         num_params: int) -> dict:
    tps = tokens / max(seconds, 1e-9)
    epoch, k = data.position(step - 1)
    return {
        "step": step, "epoch": epoch, "step_in_epoch": k,
        "batch": _digest(data.indices(step - 1))[:12],
        "loss": float(m["loss"]), "kto_loss": float(m["kto_loss"]), "align_loss": float(m["align_loss"]),
        "rewards/chosen": float(m["rewards/chosen"]), "rewards/rejected": float(m["rewards/rejected"]),
        "rewards/margins": float(m["rewards/margins"]), "z_ref": float(m["z_ref"]),
        "grad_norm": float(m["grad_norm"]), "lr": lr, "tokens": tokens, "tokens_per_s": tps,
        "step_time_s": seconds,
        # Counts the trained tokens only (6 N per token: forward + backward); the no-grad KL and
        # reference forwards are extra work this estimate leaves out.
        "mfu": None if peak is None else 6.0 * num_params * tps / peak,
    }


def baseline_align_config(a):
    """The baseline's stage-3 settings: LASA's data, optimiser and steps with z = 0 for every item
    (no refusal prefix anywhere) and no alignment term, i.e. plain KTO on the same pairs."""
    import ml_collections
    b = ml_collections.ConfigDict(a.to_dict())
    b.z_mode, b.source_probs, b.lambda_align = "source", "safety=0.0,general=0.0", 0.0
    return b


def run_baseline(run) -> dict:
    """The optional ``baseline`` stage: ``run_align`` with ``baseline_align_config``, into
    ``WORKDIR/baseline`` (checkpoints, resume and export as for ``align``)."""
    return run_align(run, stage="baseline")


def run_align(run, stage: str = "align") -> dict:
    """Stage 3: Latent-KTO fine-tuning of the base model; resumes from ``<stage>/checkpoints``."""
    from tqdm.auto import tqdm
    from lasa_jax.data.readers import read_kto_pairs
    from lasa_jax.models.checkpoint import weights_digest
    from lasa_jax.pipeline import bottleneck_layer, resolve_data_path

    c = run.config
    a = c.align if stage == "align" else baseline_align_config(c.align)
    if a.reference not in ("precomputed", "per_step"):
        raise ValueError(f"config.align.reference must be 'precomputed' or 'per_step', got {a.reference!r}")
    out_dir = run.stage_dir(stage)
    lm = run.load(stage="align")
    pairs = read_kto_pairs(resolve_data_path(c.data.kto_pairs, c.model.path))
    verdicts = None
    if a.z_mode == "ssi":
        verdicts = ssi_verdicts(lm, [p.prompt for p in pairs], os.path.join(run.workdir, "ssi"),
                                batch_size=c.ssi.batch_size_features, progress=c.progress)
    items = make_items(pairs, a, seed=c.seed, verdicts=verdicts)
    data = KTOBatches(items, lm.tokenizer, batch_size=a.batch_size, grad_accum=a.grad_accum, seed=c.seed,
                      epochs=a.epochs, max_steps=a.max_steps, max_length=a.max_length,
                      max_prompt_length=a.max_prompt_length, pad_id=lm.pad_id)
    bm = shd.batch_multiple(lm.mesh)
    if (a.batch_size // a.grad_accum) % bm:
        raise ValueError(f"config.align: batch_size / grad_accum = {a.batch_size // a.grad_accum} items per "
                         f"micro-batch is not divisible by the mesh's data*fsdp = {bm}")
    align_data, layer = None, None
    if a.lambda_align > 0:
        layer = bottleneck_layer(run, a.align_layer)
        lm.check_layers([layer])
        align_data = AlignBatches(lm, _load_queries(run), queries_per_step=a.align_batch_queries,
                                  seed=c.seed, chat_template=c.data.feature_text == "chat", batch_multiple=bm)
    total = data.total_steps
    trainer = Trainer(lm, a, total_steps=total, per_step_reference=a.reference == "per_step",
                      lambda_align=a.lambda_align, align_layer=layer)
    base_params = lm.params
    lm = lm.with_params(None)  # its buffers become the policy's, which every step donates
    model_key = _digest(weights_digest(lm.path), str(lm.param_dtype), str(lm.dtype))
    ref_path = None
    if a.reference == "precomputed":
        ref_path = cached_reference(trainer, base_params, data, out_dir, model_key, progress=c.progress)

    run_key = {"data": data.key, "model": model_key, "total_steps": total, "lambda_align": float(a.lambda_align),
               "align_layer": layer}
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    mngr = _checkpoint_manager(ckpt_dir, a)
    params, opt_state = base_params, None
    rng = jax.random.key_data(jax.random.key(c.seed))
    start = 0
    latest = mngr.latest_step()
    if latest is None:
        opt_state = trainer.init_opt_state(params)
    else:
        as_abstract = lambda tree, shardings: jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
        abstract = {"params": as_abstract(params, trainer.param_shardings),
                    "opt_state": as_abstract(jax.eval_shape(trainer.tx.init, params), trainer.opt_shardings),
                    "step": np.zeros((), np.int64), "rng": np.asarray(rng)}
        if a.reference == "precomputed":
            del params  # the base weights are no longer needed: free them before restoring
        state, meta = _restore(mngr, latest, abstract)
        differs = sorted(k for k in run_key if meta.get("run_key", {}).get(k) != run_key[k])
        if differs:
            raise ValueError(f"{ckpt_dir}: checkpoint step {latest} belongs to a different run "
                             f"(differs in {', '.join(differs)}); use a fresh workdir or delete the checkpoints")
        params, opt_state, rng = state["params"], state["opt_state"], np.asarray(state["rng"])
        start = int(state["step"])
        log.info("align: resuming from step %d of %d (%s)", start, total, ckpt_dir)
    ref_params = None
    if a.reference == "per_step":
        # A fresh run trains the base buffers themselves (donated), so the reference is a copy.
        ref_params = base_params if start else jax.jit(
            lambda p: jax.tree.map(jnp.copy, p), out_shardings=trainer.param_shardings)(base_params)
    del base_params

    metrics_log = _MetricsLog(out_dir, start, bool(a.tensorboard))
    peak = peak_flops(list(lm.mesh.devices.flat))
    last_good = latest
    last_row: dict = {}
    every = max(int(a.checkpoint_every), 1)
    bar = tqdm(total=total, initial=start, desc=stage, disable=not (c.progress and distributed.is_primary()))

    def host_batch(s):
        host = data.host_batch(s)
        if align_data is not None:
            host.update(align_data.host_batch(s))
        return host

    try:
        upcoming = host_batch(start) if start < total else None
        t0 = time.perf_counter()
        for s in range(start, total):
            host = upcoming
            params, opt_state, m = trainer.step(params, opt_state, host, s, ref_params)
            # Tokenise the next batch while the device works on this one.
            upcoming = host_batch(s + 1) if s + 1 < total else None
            m = jax.device_get(m)
            seconds, t0 = time.perf_counter() - t0, time.perf_counter()
            if not (np.isfinite(m["loss"]) and m["params_finite"]):
                mngr.wait_until_finished()
                where = "none" if last_good is None else f"step {last_good} at {os.path.join(ckpt_dir, str(last_good))}"
                raise NonFiniteLoss(f"non-finite loss at step {s + 1}; last good checkpoint: {where} "
                                    f"(loss={float(m['loss'])}, updated params finite: {bool(m['params_finite'])})")
            rng = np.asarray(jax.random.key_data(jax.random.split(jax.random.wrap_key_data(rng))[0]))
            tokens = int(host["mask"].sum())
            last_row = _row(s + 1, data, m, float(trainer.schedule(s)), tokens, seconds, peak, trainer.num_params)
            metrics_log.write(last_row)
            bar.update()
            bar.set_postfix(loss=f"{last_row['loss']:.4f}", margin=f"{last_row['rewards/margins']:.3f}")
            if (s + 1) % every == 0 or s + 1 == total:
                _save(mngr, s + 1, {"params": params, "opt_state": opt_state,
                                    "step": np.asarray(s + 1, np.int64), "rng": rng},
                      {"run_key": run_key, "step": s + 1})
                last_good = s + 1
                _after_checkpoint(s + 1, mngr)
        mngr.wait_until_finished()
    finally:
        bar.close()
        metrics_log.close()
    mngr.close()

    hf_dir = None
    if a.export:
        # Only now: the final checkpoint is committed, so a crash during export loses nothing.
        hf_dir = os.path.join(out_dir, "hf")
        lm.with_params(params).save(hf_dir, dtype=a.export_dtype or lm.param_dtype)
    summary = {"steps": total, "resumed_from": start, "final_loss": last_row.get("loss"),
               "final_margin": last_row.get("rewards/margins"), "checkpoints": ckpt_dir,
               "metrics": metrics_log.path, "reference": ref_path, "hf": hf_dir, "num_items": len(items)}
    if distributed.is_primary():
        atomic_write_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2))
    return summary


def _after_checkpoint(step: int, mngr) -> None:
    """Hook for tests (crash injection after a checkpoint is issued); does nothing by default."""

