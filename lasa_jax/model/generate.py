"""KV-cache text generation for a ``LanguageModel``: greedy, temperature and top-p sampling.

One jitted function per model generates a whole batch: it prefills a LEFT-padded prompt batch
into a cache of ``prompt_len + max_new_tokens`` slots, then decodes one token per step inside a
``jax.lax.while_loop`` that stops as soon as every row has emitted an end-of-sequence token (or
``max_new_tokens`` is reached). Rows that are done keep stepping with a padding token that is
not a valid key, and their outputs are ignored.

Decisions:
- The returned ids are the NEW tokens only and INCLUDE the stopping EOS token when there is one
  (as transformers' ``generate`` does), so a caller can tell "stopped" from "ran out of
  ``max_new_tokens``" by the last id; ``generate_text`` drops special tokens when decoding.
- Prompts are sorted by length into batches (results come back in input order), lengths are
  rounded up to ``pad_to_multiple`` and every batch has ``batch_size`` rows, so a run compiles a
  handful of shapes, not one per batch.
- Sampling randomness: the token of prompt i at step t uses ``fold_in(fold_in(key, i), t)``,
  i = the prompt's index in the input list. A prompt's sample therefore depends only on the key,
  its index and the model, not on which other prompts share its batch.
- Order of logit processing as in transformers: temperature, then top-p (nucleus: the smallest
  set of most likely tokens whose probability reaches ``top_p``; the most likely token is always
  kept, so ``top_p -> 0`` is greedy).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lasa_jax.errors import CheckpointError
from lasa_jax.infra import fileio
from lasa_jax.infra.mesh import batch_multiple
from lasa_jax.infra.multihost import show_progress, to_host
from lasa_jax.model.lm import LanguageModel, pad_batch, round_up
from lasa_jax.model.transformer import KVCache

log = logging.getLogger(__name__)


def eos_ids_of(lm: LanguageModel) -> list[int]:
    """Union of the checkpoint's generation_config.json ``eos_token_id`` (int or list) and the
    tokenizer's ``eos_token_id``. Instruct checkpoints list their end-of-turn token there
    (LLaMA-3's ``<|eot_id|>``, Qwen's ``<|im_end|>``), which is what ends an assistant reply."""
    ids: list[int] = []
    path = os.path.join(lm.path, "generation_config.json") if lm.path else None
    if path and fileio.exists(path):
        try:
            value = json.loads(fileio.read_text(path)).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if value is not None:
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, int) for v in values):
                raise CheckpointError(f"{path}: eos_token_id must be an int or a list of ints, got {value!r}")
            ids.extend(values)
    tok = lm.tokenizer
    if tok is not None and tok.eos_token_id is not None:
        ids.append(int(tok.eos_token_id))
    return sorted(set(ids))


def _nucleus(logits, top_p):
    """Logits outside the top-p nucleus set to -inf (for one row of (V,) logits)."""
    sorted_logits = jnp.sort(logits)[::-1]
    probs = jax.nn.softmax(sorted_logits)
    mass_before = jnp.cumsum(probs) - probs
    # Tokens whose preceding mass already reaches top_p are dropped; index 0 always stays.
    n_keep = jnp.maximum(jnp.sum(mass_before < top_p), 1)
    return jnp.where(logits >= sorted_logits[n_keep - 1], logits, -jnp.inf)


def _select_tokens(logits, keys, sample, temperature, top_p):
    """Next token of every row from (B, V) float32 logits and (B,) keys.

    ``sample`` and ``top_p < 1`` are scalar branch conditions (``lax.cond``), not static
    arguments: one compilation serves greedy and sampled decoding, and greedy decoding never
    pays for the vocabulary sort."""
    def sampled(logits):
        logits = logits / temperature
        logits = jax.lax.cond(top_p < 1.0, jax.vmap(_nucleus, in_axes=(0, None)),
                              lambda x, _: x, logits, top_p)
        return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)

    greedy = lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.lax.cond(sample, sampled, greedy, logits)


def _build_generate_fn(module):
    cfg, dtype = module.cfg, module.dtype

    def fn(params, tokens, mask, row_valid, row_ids, key, sample, temperature, top_p, eos, pad_id,
           *, max_new_tokens: int):
        B, T = tokens.shape
        cache = KVCache.empty(cfg, B, T + max_new_tokens, dtype, stacked=module.scan_layers)
        if T > 1:
            # The last prompt column is fed by the first loop step, which yields the logits of
            # the first new token; the prefill itself needs no logits (a (B, T, V) array).
            cache = module.apply({"params": params}, tokens[:, :-1], mask[:, :-1], cache=cache,
                                 return_logits=False).cache
        row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(row_ids)

        def cond(state):
            step, _, _, _, done, _ = state
            return (step < max_new_tokens) & ~jnp.all(done)

        def body(state):
            step, cache, cur, cur_valid, done, out = state
            res = module.apply({"params": params}, cur[:, None], cur_valid[:, None], cache=cache)
            step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
            nxt = _select_tokens(res.logits[:, 0], step_keys, sample, temperature, top_p)
            nxt = jnp.where(done, pad_id, nxt)
            out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
            # A row's EOS is still a real token (fed with mask True); after it the row is done
            # and its padding is fed as an invalid key.
            return step + 1, res.cache, nxt, ~done, done | jnp.isin(nxt, eos), out

        out = jnp.full((B, max_new_tokens), pad_id, jnp.int32)
        state = (jnp.zeros((), jnp.int32), cache, tokens[:, -1], mask[:, -1], ~row_valid, out)
        step, *_, out = jax.lax.while_loop(cond, body, state)
        return out, step

    return jax.jit(fn, static_argnames=("max_new_tokens",))


_GENERATE_FNS: dict = {}


def _generate_fn(lm: LanguageModel):
    # One jitted function per distinct module (architecture, dtypes, attention), shared by
    # models that differ only in weights (base and aligned), so they share compilations.
    if lm.module not in _GENERATE_FNS:
        _GENERATE_FNS[lm.module] = _build_generate_fn(lm.module)
    return _GENERATE_FNS[lm.module]


def generate(lm: LanguageModel, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int = 512,
             temperature: float = 0.0, top_p: float = 1.0, key: jax.Array | None = None,
             eos_ids: Sequence[int] | None = None, batch_size: int = 16, pad_to_multiple: int = 64,
             progress: bool = True) -> list[list[int]]:
    """New token ids for each prompt (in input order), each cut after its first EOS id (kept).

    ``temperature == 0`` is greedy (argmax); otherwise tokens are sampled at ``temperature``
    with nucleus ``top_p`` from ``key`` (default ``jax.random.key(0)``). ``eos_ids`` default to
    ``eos_ids_of(lm)``; an empty list generates exactly ``max_new_tokens`` tokens.
    """
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in [0, 1], got {top_p}")
    if batch_size < 1:
        raise ValueError(f"generate: batch_size must be >= 1, got {batch_size}")
    prompt_ids = [list(map(int, p)) for p in prompt_ids]
    for i, p in enumerate(prompt_ids):
        if not p:
            raise ValueError(f"generate: prompt {i} has no tokens")
        if len(p) + max_new_tokens > lm.cfg.max_position_embeddings:
            raise ValueError(f"generate: prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that "
                             f"exceeds the model's max_position_embeddings={lm.cfg.max_position_embeddings} "
                             "(cut prompts with lasa_jax.model.lengths.PromptBound)")
        bad = [t for t in p if not 0 <= t < lm.cfg.vocab_size]
        if bad:
            raise ValueError(f"generate: prompt {i} has token id {bad[0]} outside the vocabulary "
                             f"(size {lm.cfg.vocab_size})")
    if not prompt_ids:
        return []
    lm = lm.for_decoding()
    eos = list(eos_ids_of(lm) if eos_ids is None else eos_ids)
    # -1 never matches; a fixed length of 8 keeps one compilation for most EOS sets.
    eos_arr = np.full(round_up(max(len(eos), 1), 8), -1, np.int32)
    eos_arr[:len(eos)] = eos
    sample = temperature > 0
    key = jax.random.key(0) if key is None else key
    rows = batch_size
    if lm.mesh is not None:
        rows = round_up(batch_size, batch_multiple(lm.mesh))
    fn = _generate_fn(lm)
    order = np.argsort([len(p) for p in prompt_ids], kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    results: list[list[int] | None] = [None] * len(prompt_ids)
    for idx in tqdm(batches, desc="generate", disable=not show_progress(progress), leave=False):
        tokens, mask = pad_batch([prompt_ids[i] for i in idx], lm.pad_id, padding_side="left",
                                 pad_to_multiple=pad_to_multiple, batch_multiple=rows)
        row_valid = np.zeros(tokens.shape[0], bool)
        row_valid[:len(idx)] = True
        row_ids = np.zeros(tokens.shape[0], np.int32)
        row_ids[:len(idx)] = idx
        tokens, mask, row_valid, row_ids = lm._place(tokens, mask, row_valid, row_ids)
        out, _ = fn(lm.params, tokens, mask, row_valid, row_ids, key, jnp.bool_(sample),
                    jnp.float32(temperature if sample else 1.0), jnp.float32(top_p), eos_arr,
                    jnp.int32(lm.pad_id), max_new_tokens=max_new_tokens)
        out = to_host(out)
        for r, i in enumerate(idx):
            results[i] = _cut_at_eos(out[r], eos)
    return results  # type: ignore[return-value]


def _cut_at_eos(row: np.ndarray, eos: Sequence[int]) -> list[int]:
    hits = np.flatnonzero(np.isin(row, eos)) if eos else np.zeros(0, int)
    return row[: hits[0] + 1].tolist() if hits.size else row.tolist()


def generate_text(lm: LanguageModel, texts: Sequence[str], *, chat_template: bool = False,
                  add_special_tokens: bool = True, **kw) -> list[str]:
    """Generate from text prompts and decode the new tokens with ``skip_special_tokens=True``.
    Keyword arguments go to ``generate``."""
    ids = generate(lm, lm.token_ids(texts, chat_template=chat_template,
                                    add_special_tokens=add_special_tokens), **kw)
    return lm.tokenizer.batch_decode(ids, skip_special_tokens=True)
