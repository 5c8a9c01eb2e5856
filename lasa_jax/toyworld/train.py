"""Pretraining and instruction/safety tuning of the toy model: one small jitted next-token trainer.

Both phases are the same loop over fixed-shape batches (token ids, a loss mask); they differ only
in the rows: pretraining rows are BOS + document (+ end of text), loss on every real token after
BOS; SFT rows are chat-templated (user, assistant) pairs, loss on the assistant's tokens and the
closing <|eot_id|> only. Data order comes from `numpy.random.default_rng(seed)`, parameters from
`jax.random.key(seed)`, so a run is a pure function of its seed on a given backend.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lasa_jax.method.kto import token_logps
from lasa_jax.model.config import ModelConfig
from lasa_jax.model.transformer import Transformer
from lasa_jax.model.transformer import init_params as transformer_init


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0


def encode_documents(tokenizer, docs: Sequence[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """BOS + document + <|end_of_text|>, right-padded; loss on every real token after BOS."""
    end = tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    rows = [tokenizer(d)["input_ids"] + [end] for d in docs]
    return _pad(rows, [[0] + [1] * (len(r) - 1) for r in rows], tokenizer.pad_token_id, seq_len, "document")


def encode_chats(tokenizer, examples: Sequence[dict], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Chat-templated user/assistant pairs; loss on the assistant turn (its text and <|eot_id|>).
    An example's optional `prefix` opens the assistant turn as input (no loss), laid out exactly
    as LASA's evaluation writes it (`kto_data.assistant_prefix_text`)."""
    from lasa_jax.method.gate import PREFIX_SEPARATOR, assistant_prefix_text
    rows, masks = [], []
    for ex in examples:
        prefix = ex.get("prefix")
        head = assistant_prefix_text(tokenizer, ex["prompt"], prefix)
        content = prefix + PREFIX_SEPARATOR + ex["response"] if prefix else ex["response"]
        full = tokenizer.apply_chat_template([{"role": "user", "content": ex["prompt"]},
                                              {"role": "assistant", "content": content}], tokenize=False)
        if not full.startswith(head):
            raise ValueError("chat template: the assistant turn does not extend the generation prompt")
        n_head = len(tokenizer(head, add_special_tokens=False)["input_ids"])
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        rows.append(ids)
        masks.append([0] * n_head + [1] * (len(ids) - n_head))
    return _pad(rows, masks, tokenizer.pad_token_id, seq_len, "chat example")


def pack_stream(tokenizer, docs, seq_len: int, n_rows: int, *, max_pairs: int = 4):
    """World v4 (change 8): "BOS document <|end_of_text|>" for each document, concatenated into
    one stream and cut into `n_rows` rows of `seq_len` tokens (no padding; a document may run on
    into the next row). Loss on every token but BOS and each row's first. For v4-planted, the
    in-row positions of the two request ends of each parallel request document
    (`Document.request_pair`) whose both ends fall in one row: `pairs` (n_rows, max_pairs, 2) int32
    and `pair_valid` (n_rows, max_pairs) float32 (a row's pairs beyond `max_pairs` are dropped)."""
    end = tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    bos = tokenizer.bos_token_id
    ids = tokenizer([d.text for d in docs])["input_ids"]
    firsts = [d.request_pair[0] for d in docs if d.request_pair]
    first_len = iter(len(x) for x in tokenizer(firsts, add_special_tokens=False)["input_ids"]) if firsts else iter(())
    stream, ends = [], []
    for d, x in zip(docs, ids):
        if d.request_pair:
            start = len(stream)
            ends.append((start + next(first_len), start + len(x) - 1))  # BOS at start; A's end; B's end
        stream += x + [end]
    need = n_rows * seq_len
    if len(stream) < need:
        raise ValueError(f"pack_stream: {len(stream)} tokens for {n_rows} rows of {seq_len}")
    tokens = np.asarray(stream[:need], np.int32).reshape(n_rows, seq_len)
    mask = (tokens != bos).astype(np.float32)
    mask[:, 0] = 0.0
    pairs = np.zeros((n_rows, max_pairs, 2), np.int32)
    valid = np.zeros((n_rows, max_pairs), np.float32)
    for a, b in ends:
        row = a // seq_len
        if row >= n_rows or b // seq_len != row:
            continue
        k = int(valid[row].sum())
        if k < max_pairs:
            pairs[row, k] = (a - row * seq_len, b - row * seq_len)
            valid[row, k] = 1.0
    return tokens, mask, pairs, valid


def _pad(rows, masks, pad_id, seq_len, what):
    n = len(rows)
    tokens = np.full((n, seq_len), pad_id, np.int32)
    mask = np.zeros((n, seq_len), np.float32)
    for i, (r, m) in enumerate(zip(rows, masks)):
        if len(r) > seq_len:
            raise ValueError(f"{what} {i}: {len(r)} tokens exceed seq_len={seq_len}")
        tokens[i, :len(r)] = r
        mask[i, :len(m)] = m
    return tokens, mask


def next_token_loss(params, model: Transformer, tokens, mask):
    """Mean negative log-likelihood of the tokens where `mask` is set (mask indexed like
    `tokens`: mask[:, t] = 1 scores log p(tokens[:, t] | tokens[:, <t]))."""
    # Rows are right-padded and attention is causal, so padding never reaches a position that
    # carries loss; no attention mask is needed.
    logits = model.apply({"params": params}, tokens).logits
    lp = token_logps(logits, tokens)  # already shifted: aligned with `tokens`
    return -(lp * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def planted_loss(params, model: Transformer, tokens, mask, pairs, valid, layer: int, lam: float):
    """v4-planted's pretraining objective: the next-token loss plus lam * mean (1 - cos) between
    the layer-`layer` states at the two positions of each valid pair (world.py, "v4-planted").
    Returns (total, (next-token loss, alignment term))."""
    out = model.apply({"params": params}, tokens, capture="full")
    lp = token_logps(out.logits, tokens)
    nll = -(lp * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    h = out.hidden[layer].astype(jnp.float32)  # (B, T, d)
    ha = jnp.take_along_axis(h, pairs[..., 0][..., None], axis=1)
    hb = jnp.take_along_axis(h, pairs[..., 1][..., None], axis=1)
    cos = (ha * hb).sum(-1) / jnp.maximum(jnp.linalg.norm(ha, axis=-1) * jnp.linalg.norm(hb, axis=-1), 1e-6)
    align = ((1.0 - cos) * valid).sum() / jnp.maximum(valid.sum(), 1.0)
    return nll + lam * align, (nll, align)


@functools.lru_cache(maxsize=8)
def make_planted_step(model_cfg: ModelConfig, cfg: TrainConfig, layer: int, lam: float):
    model, tx = Transformer(model_cfg), optimizer(cfg)

    @jax.jit
    def step(params, opt_state, tokens, mask, pairs, valid):
        (_, (nll, align)), grads = jax.value_and_grad(
            lambda p: planted_loss(p, model, tokens, mask, pairs, valid, layer, lam), has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, nll, align

    return step, tx


@functools.lru_cache(maxsize=8)
def make_step(model_cfg: ModelConfig, cfg: TrainConfig) -> tuple[Callable, optax.GradientTransformation]:
    """The jitted step for one (model, optimiser) configuration; cached so a second run with the
    same configuration (a determinism check, a rebuild) does not compile again."""
    model, tx = Transformer(model_cfg), optimizer(cfg)

    @jax.jit
    def step(params, opt_state, tokens, mask):
        loss, grads = jax.value_and_grad(lambda p: next_token_loss(p, model, tokens, mask))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, tx


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                                  max(cfg.steps, cfg.warmup_steps + 1), cfg.learning_rate * 0.05)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(schedule, weight_decay=cfg.weight_decay))


def init_params(model_cfg: ModelConfig, seed: int) -> dict:
    return transformer_init(model_cfg, jax.random.key(seed))


def train(model_cfg: ModelConfig, params: dict, tokens: np.ndarray, mask: np.ndarray, cfg: TrainConfig, *,
          seed: int, log_every: int = 0, name: str = "train", planted: tuple | None = None,
          aux_losses: list | None = None) -> tuple[dict, list[float]]:
    """`cfg.steps` AdamW steps on batches drawn (without replacement within a pass) from the rows.
    Returns the final parameters and the (next-token) loss of every step. `planted` = (pairs,
    valid, layer, lam) adds v4-planted's alignment term (`planted_loss`), whose value per step is
    appended to `aux_losses`; the data order is the same either way."""
    if planted is None:
        step, tx = make_step(model_cfg, cfg)
    else:
        pairs, valid, layer, lam = planted
        pstep, tx = make_planted_step(model_cfg, cfg, int(layer), float(lam))
    opt_state = tx.init(params)
    rng = np.random.default_rng(seed)
    order, pos, losses = rng.permutation(len(tokens)), 0, []
    t0 = time.time()
    for i in range(cfg.steps):
        if pos + cfg.batch_size > len(order):
            order, pos = rng.permutation(len(tokens)), 0
        idx = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        if planted is None:
            params, opt_state, loss = step(params, opt_state, jnp.asarray(tokens[idx]), jnp.asarray(mask[idx]))
        else:
            params, opt_state, loss, align = pstep(params, opt_state, jnp.asarray(tokens[idx]), jnp.asarray(mask[idx]),
                                                   jnp.asarray(pairs[idx]), jnp.asarray(valid[idx]))
            if aux_losses is not None:
                aux_losses.append(align)
        losses.append(loss)
        if log_every and (i + 1) % log_every == 0:
            print(f"[{name}] step {i + 1}/{cfg.steps} loss {float(loss):.4f} ({time.time() - t0:.0f}s)", flush=True)
    if aux_losses is not None:
        aux_losses[:] = [float(x) for x in aux_losses]
    return params, [float(x) for x in losses]
