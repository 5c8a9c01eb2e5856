"""Greedy replies of a toy model to chat prompts, and the per-language judgement of them.

Used to measure the toy checkpoint right after it is built (before any LASA stage) and by the
tests. Sequences are tiny, so each new token is a full forward over a fixed-size, left-padded
buffer: one compiled shape, no KV cache to get wrong. The pipeline's own evaluation stage is what
measures base / baseline / LASA models.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lasa_jax.models.transformer import Transformer


def greedy_replies(model_cfg, params, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 24,
                   batch_size: int = 64, prefix: str | None = None) -> list[str]:
    from lasa_jax.data.kto_data import assistant_prefix_text
    heads = [tokenizer(assistant_prefix_text(tokenizer, p, prefix), add_special_tokens=False)["input_ids"]
             for p in prompts]
    width = max(len(h) for h in heads) + max_new_tokens
    eot, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    model = Transformer(model_cfg)

    @jax.jit
    def next_token(params, tokens, mask, col):
        # Causal attention: the logits at `col` see only columns <= col, so the unwritten right
        # part of the buffer does not matter and the shape never changes.
        logits = model.apply({"params": params}, tokens, mask).logits
        return jnp.argmax(jax.lax.dynamic_index_in_dim(logits, col, axis=1, keepdims=False), axis=-1)

    head_end = width - max_new_tokens
    out = []
    for start in range(0, len(heads), batch_size):
        chunk = heads[start:start + batch_size]
        tokens = np.full((batch_size, width), pad, np.int32)
        mask = np.zeros((batch_size, width), bool)
        for i, h in enumerate(chunk):  # left padding, the reply grows to the right
            tokens[i, head_end - len(h):head_end] = h
            mask[i, head_end - len(h):head_end] = True
        mask[len(chunk):, head_end - 1] = True  # filler rows need one real token
        done = np.zeros(batch_size, bool)
        done[len(chunk):] = True
        replies = [[] for _ in chunk]
        for t in range(max_new_tokens):
            col = head_end + t
            nxt = np.asarray(next_token(params, jnp.asarray(tokens), jnp.asarray(mask), col - 1))
            for i in range(len(chunk)):
                if not done[i]:
                    if nxt[i] == eot:
                        done[i] = True
                    else:
                        replies[i].append(int(nxt[i]))
            if done.all():
                break
            tokens[:, col], mask[:, col] = nxt, True
        out += [tokenizer.decode(r, skip_special_tokens=True) for r in replies]
    return out
