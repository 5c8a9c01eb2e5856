"""Last-real-token features of many prompts, packed several to a row.

Every stage that needs a prompt's feature (the bottleneck finder, SSI training and scoring,
SSI-gated inference) goes through ``extract_features`` so they all read the same thing.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from lasa_jax.infra.mesh import batch_multiple
from lasa_jax.infra.multihost import show_progress, to_host
from lasa_jax.model.lengths import PromptBound
from lasa_jax.model.lm import LanguageModel, pad_batch, round_up
from lasa_jax.model.packing import pack

# config.data.feature_text -> the name an SSI artifact records for the convention it was trained on.
FEATURE_KINDS = {"raw": "last_real_token_raw_prompt", "chat": "last_real_token_chat_template"}


def extract_features(lm: LanguageModel, texts: Sequence[str], layers: Sequence[int] | None = None, *,
                     batch_size: int = 16, chat_template: bool = False, padding_side: str | None = None,
                     max_length: int | None = None, bound: PromptBound | None = None,
                     progress: bool = True) -> np.ndarray:
    """(len(layers), N, d) float32 features in the order of ``texts``.

    By default prompts are packed several to a row (``lasa_jax.model.packing``: batches of
    ``batch_size`` rows, segments kept apart), so a forward computes almost no padding; with
    ``padding_side`` "right" or "left", one prompt per row instead, sorted by token length so
    each batch carries little padding. One jitted pass per batch computes every requested layer
    at once. Each prompt keeps at most ``bound.limit`` tokens (its end; ``bound`` counts what it
    cut), by default the model's ``max_position_embeddings``."""
    if bound is None:
        bound = PromptBound(lm.cfg.max_position_embeddings)
    ids = lm.token_ids(texts, chat_template=chat_template, max_length=max_length, bound=bound)
    return features_of_ids(lm, ids, layers, batch_size=batch_size, padding_side=padding_side,
                           progress=progress)


def features_of_ids(lm: LanguageModel, ids: Sequence[Sequence[int]], layers: Sequence[int] | None = None, *,
                    batch_size: int = 16, padding_side: str | None = None, progress: bool = True) -> np.ndarray:
    """``extract_features`` of token id lists."""
    layers = lm.check_layers(layers)
    out = np.zeros((len(layers), len(ids), lm.cfg.hidden_size), np.float32)
    if not ids:
        return out
    # Every batch has the same number of rows (a multiple of the data-parallel size), so the
    # last short batch does not trigger another compilation; packed batches may take fewer.
    multiple = batch_multiple(lm.mesh) if lm.mesh is not None else 1
    rows = round_up(batch_size, multiple)
    if padding_side is None:
        for batch in tqdm(pack(ids, rows=rows, pad_id=lm.pad_id, row_multiple=multiple), desc="features",
                          disable=not show_progress(progress), leave=False):
            feats = to_host(lm.packed_features(batch, layers))
            idx, r, k = (np.asarray(x) for x in zip(*batch.items))
            out[:, idx] = feats[:, r, k]
        return out
    order = np.argsort([len(x) for x in ids], kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc="features", disable=not show_progress(progress), leave=False):
        tokens, mask = pad_batch([ids[i] for i in idx], lm.pad_id, padding_side=padding_side,
                                 batch_multiple=rows)
        feats = to_host(lm.features(tokens, mask, layers))
        out[:, idx] = feats[:, :len(idx)]
    return out

