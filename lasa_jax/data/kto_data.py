"""Stage 3 data: preference pairs -> unpaired KTO items -> token ids with loss masks -> batches.

Text layout of one item (the same string is built at inference by `assistant_prefix_text`):

    chat_template([user: prompt], add_generation_prompt=True) + [REFUSAL_PREFIX + "\\n"] + completion + eos

The separator after the prefix is a newline: LLaMA-3/Qwen pre-tokenisers split a newline from the
following word, so the completion starts on a token boundary and the prompt ends exactly where
inference stops feeding text. (The authors tokenise the prefix separately and glue the ids with
no separator, which no string tokenisation reproduces.)
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

REFUSAL_PREFIX = (
    "Harmful query detected. I should refuse this request and provide a safe response in the user's language."
)
PREFIX_SEPARATOR = "\n"
Z_MODES = ("source", "ssi", "label")
# The project spec's mix: safety items conditioned half the time, general items never. The authors'
# files call their general data "ultrafeedback" (their trainer's class default there is 0.05; their
# paper setting and this spec use 0).
DEFAULT_SOURCE_PROBS = {"safety": 0.5, "general": 0.0, "ultrafeedback": 0.0}


@dataclasses.dataclass(frozen=True)
class KTOItem:
    prompt: str
    completion: str
    desirable: bool
    z: bool  # True: the refusal prefix conditions this item
    source: str
    language: str | None = None
    harmful: bool | None = None
    pair_idx: Any = None


def pairs_to_items(
    pairs: Iterable[Any],
    *,
    z_mode: str,
    source_probs: Mapping[str, float] | None = None,
    seed: int = 0,
    ssi_verdicts: Mapping[str, bool] | None = None,
) -> list[KTOItem]:
    """Each pair -> (prompt, chosen, desirable) then (prompt, rejected, undesirable).

    Pairs are duck-typed on the attributes of `lasa_jax.data.readers.KTOPair`:
    prompt, chosen, rejected, source, idx, language, harmful.

    z_mode:
      "source": one draw per *item* (not per pair), in item order, from `random.Random(seed)`,
                z = draw < source_probs[source] (default DEFAULT_SOURCE_PROBS). This is the
                authors' scheme (their trainer draws per unpaired row, chosen then rejected), so
                the chosen and the rejected of one pair may disagree, and every source listed
                consumes a draw even at probability 0; a source missing from source_probs is an
                error.
      "ssi":    z = ssi_verdicts[prompt] (the SSI's verdict on the base model's feature).
      "label":  z = pair.harmful.
    """
    if z_mode not in Z_MODES:
        raise ValueError(f"pairs_to_items: z_mode must be one of {Z_MODES}, got {z_mode!r}")
    if source_probs is None:
        source_probs = DEFAULT_SOURCE_PROBS
    if z_mode == "ssi" and ssi_verdicts is None:
        raise ValueError("pairs_to_items: z_mode='ssi' needs ssi_verdicts (prompt -> bool)")
    rng = random.Random(seed)
    items: list[KTOItem] = []
    for n, pair in enumerate(pairs):
        where = f"KTO pair {getattr(pair, 'idx', n)!r} (#{n})"
        for field in ("prompt", "chosen", "rejected"):
            value = getattr(pair, field, None)
            if not isinstance(value, str):
                raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
        source = getattr(pair, "source", None)
        harmful = getattr(pair, "harmful", None)
        for completion, desirable in ((pair.chosen, True), (pair.rejected, False)):
            if z_mode == "source":
                if source not in source_probs:
                    raise ValueError(f"{where}: source {source!r} has no entry in source_probs {dict(source_probs)}")
                z = rng.random() < float(source_probs[source])
            elif z_mode == "ssi":
                if pair.prompt not in ssi_verdicts:
                    raise ValueError(f"{where}: no SSI verdict for its prompt")
                z = bool(ssi_verdicts[pair.prompt])
            else:
                if harmful is None:
                    raise ValueError(f"{where}: z_mode='label' needs field 'harmful', which is missing")
                z = bool(harmful)
            items.append(
                KTOItem(
                    prompt=pair.prompt,
                    completion=completion,
                    desirable=desirable,
                    z=z,
                    source=source,
                    language=getattr(pair, "language", None),
                    harmful=harmful,
                    pair_idx=getattr(pair, "idx", n),
                )
            )
    return items


def assistant_prefix_text(tokenizer, prompt: str, prefix: str | None) -> str:
    """The text a model sees before its answer: templated user turn, generation prompt, prefix."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    if prefix:
        text += prefix + PREFIX_SEPARATOR
    return text


def encode_item(
    tokenizer,
    prompt: str,
    completion: str,
    *,
    prefix: str | None,
    max_length: int = 512,
    max_prompt_length: int = 384,
) -> dict[str, list[int]]:
    """Token ids of prompt+prefix+completion+eos and a mask of the tokens that carry loss.

    The whole string is tokenised once, so ids equal what the model sees at inference; a token
    carries loss iff its character span overlaps the completion or the trailing eos. A token merged
    across the boundary therefore counts as completion (it is the token the model has to emit).
    The chat template writes all special tokens itself (LLaMA's BOS included), so encoding uses
    add_special_tokens=False to avoid a second BOS.

    Truncation: the prompt part (everything before the first loss token) keeps its last
    `max_prompt_length` tokens; then the sequence keeps its first `max_length` tokens, which cuts
    the completion (and its eos) from the right.
    """
    if tokenizer.eos_token is None:
        raise ValueError("encode_item: tokenizer has no eos_token")
    head = assistant_prefix_text(tokenizer, prompt, prefix)
    text = head + completion + tokenizer.eos_token
    start = len(head)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [int(e > start and e > s) for s, e in enc["offset_mapping"]]
    if not any(mask):
        raise ValueError("encode_item: no token covers the completion/eos; the tokenizer lost the eos token")
    n_prompt = mask.index(1)
    cut = max(0, n_prompt - max_prompt_length)
    ids, mask = ids[cut:][:max_length], mask[cut:][:max_length]
    return {"input_ids": ids, "loss_mask": mask}


def kl_pairs(batch_items: Sequence[KTOItem]) -> list[KTOItem]:
    """Mismatched items for the KTO reference point, built inside one batch.

    Item i keeps its prompt, z and prefix and takes the completion of item (i - 1) mod B, which is
    TRL's rotation: (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}); the authors' trainer does the same.
    """
    if len(batch_items) < 2:
        raise ValueError("kl_pairs: the KL reference point needs a batch of at least 2 items")
    b = len(batch_items)
    return [
        dataclasses.replace(item, completion=batch_items[(i - 1) % b].completion)
        for i, item in enumerate(batch_items)
    ]


def collate(
    encoded: Sequence[Mapping[str, Sequence[int]]],
    pad_id: int,
    pad_to: int | None = None,
    padding_side: str = "right",
) -> dict[str, np.ndarray]:
    """Pad encoded items to (B, T); positions count real tokens only, so left padding is exact."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"collate: padding_side must be 'left' or 'right', got {padding_side!r}")
    lengths = [len(e["input_ids"]) for e in encoded]
    longest = max(lengths, default=0)
    width = longest if pad_to is None else pad_to
    if width < longest:
        raise ValueError(f"collate: pad_to={pad_to} is shorter than the longest item ({longest} tokens)")
    b = len(encoded)
    tokens = np.full((b, width), pad_id, np.int32)
    attn = np.zeros((b, width), bool)
    loss = np.zeros((b, width), bool)
    for i, (e, n) in enumerate(zip(encoded, lengths)):
        if len(e["loss_mask"]) != n:
            raise ValueError(f"collate: item {i} has {n} input_ids but {len(e['loss_mask'])} loss_mask entries")
        sl = slice(width - n, width) if padding_side == "left" else slice(0, n)
        tokens[i, sl] = e["input_ids"]
        attn[i, sl] = True
        loss[i, sl] = np.asarray(e["loss_mask"], bool)
    positions = np.maximum(np.cumsum(attn, axis=1) - 1, 0).astype(np.int32)
    return {"tokens": tokens, "attention_mask": attn, "loss_mask": loss, "positions": positions}


def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    """Permutation of range(n) for one epoch; a pure function of (seed, epoch) so resume recomputes it."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)
