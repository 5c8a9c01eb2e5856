"""Stage 3 data: preference pairs -> unpaired KTO items -> token ids with loss masks -> batches.

Text layout of one item (the part before the completion is what ``gate.assistant_prefix_text``
builds at inference):

    chat_template(prompt, add_generation_prompt=True) + [REFUSAL_PREFIX + "\\n"] + assistant turn

``prompt`` is a user turn or a whole conversation (TRL's conversational format); the assistant
turn is what the template writes for the reply after its generation prompt (Llama-3: the trimmed
reply + ``<|eot_id|>``; Qwen: reply + ``<|im_end|>\\n``), so with no prefix an item is exactly
TRL's tokenisation of the same conversational example. The template gets the model's
``chat_template_kwargs`` (``enable_thinking``).

* ``KTOBatches``: items tokenised once, packed into fixed-shape rows per global step; which items
  a step sees is a pure function of the step, so a resumed run replays the same order.
* ``AlignBatches``: parallel prompts for the cross-lingual alignment term, per step.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from lasa_jax.errors import ConfigError
from lasa_jax.infra.fileio import digest
from lasa_jax.method.gate import REFUSAL_PREFIX, assistant_prefix_text
from lasa_jax.model.lm import chat_text, round_up
from lasa_jax.model.packing import choose_shapes, first_fit, ladder, longest_first

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
    messages: tuple | None = None  # the prompt conversation ((role, content), ...); None = one user turn

    @property
    def prompt_messages(self) -> tuple:
        return self.messages or (("user", self.prompt),)


def pairs_to_items(
    pairs: Iterable[Any],
    *,
    z_mode: str,
    source_probs: Mapping[str, float] | None = None,
    seed: int = 0,
    ssi_verdicts: Mapping[str, bool] | None = None,
) -> list[KTOItem]:
    """Each pair -> (prompt, chosen, desirable) then (prompt, rejected, undesirable); an unpaired
    example (`lasa_jax.data.readers.KTOExample`: prompt, completion, desirable) -> one item.

    Records are duck-typed on the attributes of `lasa_jax.data.readers.KTOPair`:
    prompt, chosen, rejected, source, idx, language, harmful, messages.

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
        raise ConfigError(f"config.align.z_mode: must be one of {Z_MODES}, got {z_mode!r}")
    if source_probs is None:
        source_probs = DEFAULT_SOURCE_PROBS
    if z_mode == "ssi" and ssi_verdicts is None:
        raise ValueError("pairs_to_items: z_mode='ssi' needs ssi_verdicts (prompt -> bool)")
    rng = random.Random(seed)
    items: list[KTOItem] = []
    for n, pair in enumerate(pairs):
        where = f"KTO pair {getattr(pair, 'idx', n)!r} (#{n})"
        unpaired = hasattr(pair, "completion")
        for field in ("prompt", "completion") if unpaired else ("prompt", "chosen", "rejected"):
            value = getattr(pair, field, None)
            if not isinstance(value, str):
                raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
        source = getattr(pair, "source", None)
        harmful = getattr(pair, "harmful", None)
        completions = ([(pair.completion, bool(pair.desirable))] if unpaired
                       else [(pair.chosen, True), (pair.rejected, False)])
        for completion, desirable in completions:
            if z_mode == "source":
                if source is None:
                    raise ConfigError(f"config.align.z_mode='source': {where} has no 'source' field; give the "
                                      "data sources, or use z_mode='label' or 'ssi'")
                if source not in source_probs:
                    raise ConfigError(f"config.align.source_probs: {where} has source {source!r}, which has no "
                                      f"entry in {dict(source_probs)}")
                z = rng.random() < float(source_probs[source])
            elif z_mode == "ssi":
                if pair.prompt not in ssi_verdicts:
                    raise ValueError(f"{where}: no SSI verdict for its prompt")
                z = bool(ssi_verdicts[pair.prompt])
            else:
                if harmful is None:
                    raise ConfigError(f"config.align.z_mode='label' needs field 'harmful' in every KTO pair; "
                                      f"{where} has none")
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
                    messages=getattr(pair, "messages", None),
                )
            )
    return items


def render_item(tokenizer, prompt, completion: str, *, prefix: str | None, **template_kwargs) -> tuple[str, int]:
    """(text, start): an item as one string (module docstring) and where its assistant turn starts.

    The assistant turn is the template's rendering of the conversation with the reply, minus its
    rendering with the generation prompt; a template whose prompt is not a prefix of the
    conversation with the reply cannot place the refusal prefix and is an error. A turn without
    the eos token (a template that writes none) gets it appended, so the model learns to stop."""
    messages = [("user", prompt)] if isinstance(prompt, str) else list(prompt)
    gen = chat_text(tokenizer, messages, add_generation_prompt=True, **template_kwargs)
    full = chat_text(tokenizer, messages + [("assistant", completion)], add_generation_prompt=False,
                     **template_kwargs)
    if not full.startswith(gen):
        raise ValueError("encode_item: the chat template renders the prompt differently once a reply follows "
                         f"(prompt ends {gen[-40:]!r}, conversation has {full[len(gen) - 40:len(gen)]!r} there)")
    turn = full[len(gen):]
    if tokenizer.eos_token not in turn:
        turn += tokenizer.eos_token
    head = assistant_prefix_text(tokenizer, messages, prefix, **template_kwargs)
    return head + turn, len(head)


def encode_item(
    tokenizer,
    prompt,
    completion: str,
    *,
    prefix: str | None,
    max_length: int = 512,
    max_prompt_length: int = 384,
    template_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, list[int]]:
    """Token ids of prompt+prefix+assistant turn and a mask of the tokens that carry loss.

    The whole string is tokenised once, so ids equal what the model sees at inference; a token
    carries loss iff its character span overlaps the assistant turn (the reply and the template's
    end of turn). A token merged across the boundary therefore counts as completion (it is the
    token the model has to emit). The chat template writes all special tokens itself (LLaMA's
    BOS included), so encoding uses add_special_tokens=False to avoid a second BOS.

    Truncation: the prompt part (everything before the first loss token) keeps its last
    `max_prompt_length` tokens; then the sequence keeps its first `max_length` tokens, which cuts
    the completion (and its eos) from the right. ``prompt_tokens`` is the prompt part's length
    before cutting.
    """
    if tokenizer.eos_token is None:
        raise ValueError("encode_item: tokenizer has no eos_token")
    text, start = render_item(tokenizer, prompt, completion, prefix=prefix, **(template_kwargs or {}))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [int(e > start and e > s) for s, e in enc["offset_mapping"]]
    if not any(mask):
        raise ValueError("encode_item: no token covers the completion/eos; the tokenizer lost the eos token")
    n_prompt = mask.index(1)
    cut = max(0, n_prompt - max_prompt_length)
    ids, mask = ids[cut:][:max_length], mask[cut:][:max_length]
    return {"input_ids": ids, "loss_mask": mask, "prompt_tokens": n_prompt}


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


def place_rows(encoded: Sequence[Mapping[str, Sequence[int]]], placed: Sequence[Sequence[int]], rows: int,
               width: int, pad_id: int) -> dict[str, np.ndarray]:
    """Packed (rows, width) arrays of encoded items, ``placed[r]`` the indices (into ``encoded``)
    of row r in order: tokens, ``items`` (1 + index, 0 = padding) and loss_mask. An item's first
    token carries no loss: its log-prob would come from the previous item (``kto.item_logps``)."""
    tokens = np.full((rows, width), pad_id, np.int32)
    owner, loss = np.zeros((rows, width), np.int32), np.zeros((rows, width), bool)
    for r, row in enumerate(placed):
        at = 0
        for i in row:
            n = len(encoded[i]["input_ids"])
            tokens[r, at:at + n], owner[r, at:at + n] = encoded[i]["input_ids"], i + 1
            loss[r, at + 1:at + n] = encoded[i]["loss_mask"][1:]
            at += n
    return {"tokens": tokens, "items": owner, "loss_mask": loss}


def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    """Permutation of range(n) for one epoch; a pure function of (seed, epoch) so resume recomputes it."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


class KTOBatches:
    """Fixed-shape packed batches of KTO items, a pure function of the global step.

    Step s of an epoch of ``steps_per_epoch = ceil(N / B)`` steps takes positions s*B ... s*B+B-1 of
    ``epoch_order(N, epoch, seed)``, wrapping to the epoch's start to fill the last batch (every
    item slot is a real item). The KL pairs rotate over the whole global batch (TRL's rotation).

    Packing (no compute on padding): a step's B items go whole, longest first, into rows of
    ``width`` slots (first fit; ``length`` or twice it, whichever computes less), and the rows
    are split into ``grad_accum`` micro-batches; the KL pairs likewise. ``items`` (A, rows,
    width) names each token's item (1 ... B, 0 on padding): the model keeps items apart
    (``segment_ids``) and sums log-probs per item. Per-item arrays (``desirable``, ``valid``, the
    reference log-probs) are (B,).

    Rows per micro-batch (``step_rows``, items and KL pairs) are found for every step when the
    batches are built, from lengths only, and rounded up to 8 steps per octave and to
    ``row_multiple`` (the data-parallel size), then taken from at most ``step_shapes`` distinct
    (rows, KL rows) shapes (``packing.choose_shapes``): one compiled step per shape (``shapes``).
    1 gives every step the run's largest rows; unbounded, the toy world's 80 steps of short items
    needed 19 shapes, where compiling cost more than the padding saved.
    """

    def __init__(self, items: Sequence[KTOItem], tokenizer, *, batch_size: int, grad_accum: int = 1,
                 seed: int = 0, epochs: int = 1, max_steps: int = 0, max_length: int = 512,
                 max_prompt_length: int = 384, pad_id: int = 0, bucket: int = 16, row_multiple: int = 1,
                 step_shapes: int = 8, attention_cost: float = 0.0,
                 chat_template_kwargs: Mapping[str, Any] | None = None):
        if len(items) < 2:
            raise ConfigError(f"config.data.kto_pairs: need at least 2 items (1 pair), got {len(items)}")
        if batch_size < 2:
            raise ConfigError("config.align.batch_size must be >= 2: the KTO reference point needs a batch")
        if grad_accum < 1 or batch_size % grad_accum:
            raise ConfigError(f"config.align.batch_size={batch_size} is not divisible by grad_accum={grad_accum}")
        if not isinstance(step_shapes, int) or step_shapes < 1:
            raise ConfigError(f"config.align.step_shapes={step_shapes!r}: expected an int >= 1 (compiled step shapes)")
        self.items, self.tokenizer = list(items), tokenizer
        self.batch_size, self.grad_accum, self.seed, self.pad_id = batch_size, grad_accum, seed, pad_id
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.row_multiple = int(row_multiple)
        self.template_kwargs = dict(chat_template_kwargs or {})
        self.encoded = [self._encode(it) for it in self.items]
        # Items whose prompt part was cut: text -> its length in tokens before cutting.
        self.truncated = {it.prompt: e["prompt_tokens"] for it, e in zip(self.items, self.encoded)
                          if e["prompt_tokens"] > max_prompt_length}
        prompt_len = max(e["loss_mask"].index(1) for e in self.encoded)
        completion_len = max(len(e["loss_mask"]) - e["loss_mask"].index(1) for e in self.encoded)
        longest = max(len(e["input_ids"]) for e in self.encoded)
        # A KL pair is roughly (longest prompt part) + (longest completion); one width for all
        # steps keeps the step compiled once. A KL pair longer than that (BPE merges at the join)
        # loses the end of its completion, which only perturbs the batch's reference point.
        self.length = min(round_up(max(longest, prompt_len + completion_len), bucket), max(max_length, longest))
        self.steps_per_epoch = -(-len(self.items) // batch_size)
        self.total_steps = int(max_steps) if max_steps else int(epochs) * self.steps_per_epoch
        if self.total_steps < 1:
            raise ConfigError("config.align: epochs and max_steps give no training step")
        # Every step's item and KL-pair lengths (the KL pairs are tokenised here once to learn
        # theirs), then the row width that costs less over the run: max_length, or twice it,
        # which lets two long items share a row (items near max_length fill a row of their own
        # length badly) but makes each token attend over a wider row. ``attention_cost`` is the
        # model's ``ModelConfig.attention_cost()`` (0: count slots only).
        steps = [self.indices(s) for s in range(self.total_steps)]
        lengths = [([len(self.encoded[i]["input_ids"]) for i in idx],
                    [len(e["input_ids"]) for e in self.kl_encoded(idx)]) for idx in steps]
        options = []
        for width in (self.length, 2 * self.length):
            rows = np.asarray([[self._rows_for(n, width) for n in pair] for pair in lengths], np.int64)
            rows = choose_shapes(rows, step_shapes)
            options.append((int(rows.sum()) * width * (1 + attention_cost * width), width, rows))
        _, self.width, self.step_rows = min(options, key=lambda o: o[:2])
        self.ref_logps: np.ndarray | None = None  # (N,) once the reference is precomputed
        self.ref_kl_logps: np.ndarray | None = None  # (total_steps, B)

    def _encode(self, item: KTOItem) -> dict:
        return encode_item(self.tokenizer, item.prompt_messages, item.completion,
                           prefix=REFUSAL_PREFIX if item.z else None, max_length=self.max_length,
                           max_prompt_length=self.max_prompt_length, template_kwargs=self.template_kwargs)

    def kl_encoded(self, idx: Sequence[int]) -> list[dict]:
        """The KL pairs of a step's items (``kl_pairs``), tokenised."""
        return [self._encode(it) for it in kl_pairs([self.items[i] for i in idx])]

    def _fill(self, lengths: Sequence[int], width: int) -> list[list[int]]:
        lengths = [min(n, self.length) for n in lengths]
        return first_fit(lengths, longest_first(lengths), width)[0]

    def _rows_for(self, lengths: Sequence[int], width: int) -> int:
        per_micro = -(-len(self._fill(lengths, width)) // self.grad_accum)
        return ladder(per_micro, per_octave=8, multiple=self.row_multiple)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """The distinct (rows, kl_rows) of the run's steps: one compiled step each."""
        return sorted({(int(r), int(k)) for r, k in self.step_rows})

    @property
    def key(self) -> str:
        """Digest of everything the batches depend on: tokens, labels, order, layout."""
        toks = np.concatenate([np.asarray(e["input_ids"], np.int64) for e in self.encoded])
        masks = np.concatenate([np.asarray(e["loss_mask"], np.int8) for e in self.encoded])
        lens = np.asarray([len(e["input_ids"]) for e in self.encoded], np.int64)
        flags = np.asarray([[it.desirable, it.z] for it in self.items], np.int8)
        return digest(toks, masks, lens, flags, [self.batch_size, self.grad_accum, self.seed,
                                                   self.total_steps, self.length, self.width])

    def position(self, step: int) -> tuple[int, int]:
        return divmod(int(step), self.steps_per_epoch)

    def indices(self, step: int) -> np.ndarray:
        epoch, k = self.position(step)
        order = epoch_order(len(self.items), epoch, self.seed)
        return order[(k * self.batch_size + np.arange(self.batch_size)) % len(self.items)]

    def _packed(self, encoded, rows: int) -> dict[str, np.ndarray]:
        """(A, rows, width) tokens, items (1 + index into ``encoded``, 0 = padding), loss_mask."""
        encoded = [{k: e[k][:self.length] for k in ("input_ids", "loss_mask")} for e in encoded]
        filled = self._fill([len(e["input_ids"]) for e in encoded], self.width)
        out = place_rows(encoded, filled, self.grad_accum * int(rows), self.width, self.pad_id)
        return {k: v.reshape(self.grad_accum, int(rows), self.width) for k, v in out.items()}

    def padded(self, idx: Sequence[int], *, kl: bool = False) -> dict[str, np.ndarray]:
        """The step's items (or KL pairs) one per row, right-padded to the longest: the layout
        TRL's collator builds, for comparisons against it."""
        encoded = self.kl_encoded(idx) if kl else [self.encoded[i] for i in idx]
        return collate([{k: e[k][:self.length] for k in ("input_ids", "loss_mask")} for e in encoded], self.pad_id)

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        idx = self.indices(step)
        rows, kl_rows = self.step_rows[step]
        main = self._packed([self.encoded[i] for i in idx], rows)
        kl = self._packed(self.kl_encoded(idx), kl_rows)
        batch = {**main, **{"kl_" + k: v for k, v in kl.items()},
                 "desirable": np.asarray([self.items[i].desirable for i in idx]),
                 "valid": np.ones(len(idx), bool)}
        if self.ref_logps is not None:
            batch["ref_logps"] = self.ref_logps[idx].astype(np.float32)
            batch["ref_kl_logps"] = self.ref_kl_logps[step].astype(np.float32)
        return batch

    def padding_fraction(self, steps: Iterable[int] | None = None) -> float:
        """Padded slots / computed slots over the given steps' item and KL rows (all by default)."""
        pad = total = 0
        for s in range(self.total_steps) if steps is None else steps:
            b = self.host_batch(s)
            for k in ("items", "kl_items"):
                pad, total = pad + int((b[k] == 0).sum()), total + b[k].size
        return pad / max(total, 1)


class AlignBatches:
    """Parallel prompts for the alignment term: ``queries_per_step`` queries (every language of
    each) per step, queries drawn in a per-pass shuffled order that is a function of the step."""

    def __init__(self, lm, queries, *, queries_per_step: int, seed: int, chat_template: bool = False,
                 batch_multiple: int = 1, bound=None):
        if len(queries) < 1 or queries_per_step < 1:
            raise ConfigError("config.align.align_batch_queries: the alignment term needs parallel queries "
                              "and align_batch_queries >= 1")
        self.q = min(int(queries_per_step), len(queries))
        self.seed, self.num = seed, len(queries)
        self.rows = [[] for _ in queries]
        texts = []
        for qi, query in enumerate(queries):
            for text in query.texts.values():
                self.rows[qi].append(len(texts))
                texts.append(text)
        self.tokens, self.mask = lm.encode(texts, chat_template=chat_template, batch_multiple=1, bound=bound)
        per_step = sum(sorted(len(r) for r in self.rows)[-self.q:])
        self.width = round_up(per_step, batch_multiple)

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
