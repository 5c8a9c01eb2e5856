"""Last-real-token features of many prompts, batched by length, cached on disk.

Every stage that needs a prompt's feature (the bottleneck finder, SSI training and scoring,
SSI-gated inference) goes through ``extract_features`` so they all read the same thing.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from lasa_jax.atomic import atomic_write, atomic_write_text
from lasa_jax.lm import LanguageModel, pad_batch
from lasa_jax.sharding import to_host

FEATURE_CONVENTIONS = {False: "last_real_token_raw_prompt", True: "last_real_token_chat_template"}


def extract_features(lm: LanguageModel, texts: Sequence[str], layers: Sequence[int] | None = None, *,
                     batch_size: int = 16, chat_template: bool = False, padding_side: str = "right",
                     max_length: int | None = None, progress: bool = True) -> np.ndarray:
    """(len(layers), N, d) float32 features in the order of ``texts``.

    Prompts are sorted by token length so each batch carries little padding; one jitted pass
    per batch computes every requested layer at once."""
    layers = lm.check_layers(layers)
    if not texts:
        return np.zeros((len(layers), 0, lm.cfg.hidden_size), np.float32)
    ids = lm.token_ids(texts, chat_template=chat_template, max_length=max_length)
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = np.zeros((len(layers), len(texts), lm.cfg.hidden_size), np.float32)
    rows = _batch_rows(lm, batch_size)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc="features", disable=not progress, leave=False):
        tokens, mask = pad_batch([ids[i] for i in idx], lm.pad_id, padding_side=padding_side,
                                 batch_multiple=rows)
        feats = to_host(lm.features(tokens, mask, layers))
        out[:, idx] = feats[:, :len(idx)]
    return out


def _batch_rows(lm: LanguageModel, batch_size: int) -> int:
    """Pad every batch to the same number of rows (a multiple of the data-parallel size), so
    the last short batch does not trigger another compilation."""
    from lasa_jax.sharding import batch_multiple
    m = batch_multiple(lm.mesh) if lm.mesh is not None else 1
    return -(-batch_size // m) * m


def file_hash(*paths: str) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def cached_features(cache_dir: str | None, key_parts: dict, compute) -> np.ndarray:
    """Load features from ``cache_dir`` if an entry for exactly these key parts exists, else
    compute and store them (atomically). ``key_parts`` should name the model weights, the prompt
    file contents, the layer set and the feature convention."""
    if not cache_dir:
        return compute()
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
    path = os.path.join(cache_dir, f"features-{key}.npy")
    if os.path.exists(path):
        return np.load(path, allow_pickle=False)
    feats = compute()
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, feats, allow_pickle=False)
    atomic_write(path, write)
    atomic_write_text(os.path.join(cache_dir, f"features-{key}.json"),
                      json.dumps(key_parts, indent=2, sort_keys=True))
    return feats
