"""Greedy replies of a toy model to chat prompts: the library's own decoding (``model.generate``,
with the prefix text built by ``method.gate``) on a params tree that has no checkpoint yet.

Used to measure the toy checkpoint right after it is built (before any LASA stage) and by the
tests; the pipeline's evaluation stage is what measures base / baseline / LASA models.
"""
from __future__ import annotations

from typing import Sequence

from lasa_jax.method.gate import prompt_ids
from lasa_jax.model.generate import generate
from lasa_jax.model.lm import LanguageModel


def greedy_replies(model_cfg, params, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 24,
                   batch_size: int = 64, prefix: bool = False) -> list[str]:
    """Decoded greedy replies (special tokens dropped), stopping at the tokenizer's eos token;
    ``prefix`` puts the refusal prefix after the generation prompt of every prompt."""
    lm = LanguageModel(model_cfg, params, tokenizer=tokenizer)
    ids = generate(lm, prompt_ids(lm, list(prompts), [prefix] * len(prompts)), max_new_tokens=max_new_tokens,
                   eos_ids=[tokenizer.eos_token_id], batch_size=batch_size, pad_to_multiple=8, progress=False)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)
