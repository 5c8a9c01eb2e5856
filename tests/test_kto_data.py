"""KTO data pipeline and the local byte tokenizer (pure Python/NumPy; exact integer comparisons)."""

import dataclasses
import random
import tempfile

import numpy as np
import pytest
from transformers import AutoTokenizer

from lasa_jax.method.gate import PREFIX_SEPARATOR, REFUSAL_PREFIX
from lasa_jax.method.kto_data import (
    KTOItem,
    collate,
    encode_item,
    epoch_order,
    kl_pairs,
    pairs_to_items,
)
from lasa_jax.model.tokenizers import CHAT_STYLES, build_byte_tokenizer

from lasa_jax.data.readers import KTOPair


PROMPT = "How do I pick a lock on my own bike? ¿Puedes ayudarme?"
COMPLETION = "Je ne peux pas aider avec ça. 抱歉。"


def _head(tok, prompt, prefix):
    """Expected text before the completion, built straight from the tokenizer's template."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return text + (prefix + "\n" if prefix else "")


def _turn(tok, prompt, completion):
    """The assistant turn as the template writes it (reply + end of turn), from the template alone."""
    user = [{"role": "user", "content": prompt}]
    gen = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": completion}], tokenize=False)
    assert full.startswith(gen)
    return full[len(gen):]


@pytest.mark.parametrize("style", ["llama3", "qwen"])
def test_tokenizer_round_trip_and_conventions(style):
    tok = build_byte_tokenizer(style)
    spec = CHAT_STYLES[style]
    assert len(tok) % 8 == 0 and len(tok) < 300
    assert tok.eos_token == spec["eos_token"] and tok.pad_token == spec["pad_token"]
    text = "héllo wörld, 你好 — ok"
    ids = tok(text)["input_ids"]
    if style == "llama3":
        assert ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>") and ids[1:] == list(text.encode())
    else:
        assert tok.bos_token is None and ids == list(text.encode())
    assert tok.decode(ids, skip_special_tokens=True) == text
    msgs = [{"role": "user", "content": "hi"}]
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        back = AutoTokenizer.from_pretrained(d)
    assert back(text)["input_ids"] == ids
    for gen in (True, False):
        assert back.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False) == tok.apply_chat_template(
            msgs, add_generation_prompt=gen, tokenize=False)
    assert (back.eos_token, back.pad_token, back.bos_token) == (tok.eos_token, tok.pad_token, tok.bos_token)
    templ = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert templ.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n" if style == "llama3" else "<|im_start|>assistant\n")


@pytest.mark.parametrize("style", ["llama3", "qwen"])
@pytest.mark.parametrize("prefix", [None, REFUSAL_PREFIX])
def test_loss_mask_covers_exactly_completion_and_eos(style, prefix):
    tok = build_byte_tokenizer(style)
    enc = encode_item(tok, PROMPT, COMPLETION, prefix=prefix)
    ids, mask = enc["input_ids"], enc["loss_mask"]
    assert len(ids) == len(mask)
    on = [i for i, m in zip(ids, mask) if m]
    off = [i for i, m in zip(ids, mask) if not m]
    turn = _turn(tok, PROMPT, COMPLETION)  # llama3: reply + <|eot_id|>; qwen: reply + <|im_end|> + newline
    assert turn == COMPLETION + {"llama3": "<|eot_id|>", "qwen": "<|im_end|>\n"}[style]
    assert tok.decode(on) == turn
    assert on == tok(turn, add_special_tokens=False)["input_ids"]
    assert tok.decode(off) == _head(tok, PROMPT, prefix)
    assert mask == sorted(mask)  # prompt first, then a single run of loss tokens
    if style == "llama3":  # template's BOS only, never a second one
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    if prefix:
        assert REFUSAL_PREFIX + PREFIX_SEPARATOR in tok.decode(off)


def test_token_merged_across_boundary_carries_loss():
    """The Qwen template's generation prompt ends in '\\n'; a reply starting with '\\n' merges into
    one '\\n\\n' token. (Llama-3's template trims the reply, so it cannot start with a newline.)"""
    tok = build_byte_tokenizer("qwen", extra_merges=[("\n", "\n")])
    completion = "\nSorry, no."
    head = _head(tok, PROMPT, None)
    enc = encode_item(tok, PROMPT, completion, prefix=None)
    ids, mask = enc["input_ids"], enc["loss_mask"]
    newline2 = tok.convert_tokens_to_ids("ĊĊ")
    first = mask.index(1)
    assert ids[first] == newline2  # the straddling token is the completion's first loss token
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "\n" + _turn(tok, PROMPT, completion)
    assert tok.decode(ids[:first]) == head[:-1]
    # Tokenising the prompt alone gives a different split: the case naive length-based masking gets wrong.
    head_ids = tok(head, add_special_tokens=False)["input_ids"]
    assert ids[: len(head_ids)] != head_ids


@pytest.mark.parametrize("style", ["llama3", "qwen"])
def test_left_truncation_keeps_end_of_prompt(style):
    tok = build_byte_tokenizer(style)
    long_prompt = " ".join(f"w{i}" for i in range(200)) + " FINAL QUESTION?"
    full = encode_item(tok, long_prompt, COMPLETION, prefix=REFUSAL_PREFIX, max_length=10_000, max_prompt_length=10_000)
    cut = encode_item(tok, long_prompt, COMPLETION, prefix=REFUSAL_PREFIX, max_length=10_000, max_prompt_length=200)
    n_full = full["loss_mask"].index(1)
    assert n_full > 200 and cut["loss_mask"].index(1) == 200
    assert cut["input_ids"] == full["input_ids"][n_full - 200:]
    assert REFUSAL_PREFIX in tok.decode(cut["input_ids"][:200])

    short = encode_item(tok, long_prompt, COMPLETION, prefix=None, max_length=60, max_prompt_length=50)
    assert len(short["input_ids"]) == 60 and sum(short["loss_mask"]) == 10
    on = [i for i, m in zip(short["input_ids"], short["loss_mask"]) if m]
    assert on == tok(COMPLETION, add_special_tokens=False)["input_ids"][:10]  # completion cut from the right


def _pairs(n):
    return [
        KTOPair(prompt=f"q{i}", chosen=f"c{i}", rejected=f"r{i}",
                source="safety" if i % 2 == 0 else "general", idx=str(i), language="en", harmful=i % 2 == 0)
        for i in range(n)
    ]


def test_pairs_to_items_source_mode_seeded():
    pairs = _pairs(400)
    items = pairs_to_items(pairs, z_mode="source", seed=7)
    assert len(items) == 800
    assert [(it.prompt, it.completion, it.desirable) for it in items[:4]] == [
        ("q0", "c0", True), ("q0", "r0", False), ("q1", "c1", True), ("q1", "r1", False)]
    assert items == pairs_to_items(pairs, z_mode="source", seed=7)
    assert [it.z for it in items] != [it.z for it in pairs_to_items(pairs, z_mode="source", seed=8)]
    assert not any(it.z for it in items if it.source == "general")
    rate = np.mean([it.z for it in items if it.source == "safety"])
    assert 0.4 < rate < 0.6  # 400 Bernoulli(0.5) draws: sd 0.025
    # Authors' scheme: one random.Random(seed) draw per unpaired row, in row order.
    rng = random.Random(7)
    expected = [rng.random() < {"safety": 0.5, "general": 0.0}[it.source] for it in items]
    assert [it.z for it in items] == expected
    with pytest.raises(ValueError, match="source 'other'"):
        pairs_to_items([dataclasses.replace(pairs[0], source="other")], z_mode="source", seed=0)


def test_pairs_to_items_ssi_and_label_modes():
    pairs = _pairs(6)
    verdicts = {p.prompt: p.idx in (1, 4) for p in pairs}
    ssi = pairs_to_items(pairs, z_mode="ssi", ssi_verdicts=verdicts)
    assert [it.z for it in ssi] == [p.idx in (1, 4) for p in pairs for _ in range(2)]
    lab = pairs_to_items(pairs, z_mode="label")
    assert [it.z for it in lab] == [p.harmful for p in pairs for _ in range(2)]
    with pytest.raises(ValueError, match="no SSI verdict"):
        pairs_to_items(pairs, z_mode="ssi", ssi_verdicts={})
    with pytest.raises(ValueError, match="'harmful'"):
        pairs_to_items([dataclasses.replace(pairs[0], harmful=None)], z_mode="label")
    with pytest.raises(ValueError, match="'chosen'"):
        pairs_to_items([dataclasses.replace(pairs[0], chosen=None)], z_mode="label")


def test_kl_pairs_rotate_like_trl():
    """TRL: (x_1, y_1..n) -> (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}); prompt, z and label stay."""
    items = [KTOItem(f"x{i}", f"y{i}", i % 2 == 0, i == 1, "safety") for i in range(4)]
    kl = kl_pairs(items)
    assert [(k.prompt, k.completion) for k in kl] == [("x0", "y3"), ("x1", "y0"), ("x2", "y1"), ("x3", "y2")]
    assert [k.z for k in kl] == [it.z for it in items]


def test_epoch_order():
    a = epoch_order(50, 0, seed=3)
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, epoch_order(50, 0, seed=3))
    assert not np.array_equal(a, epoch_order(50, 1, seed=3))
    assert not np.array_equal(a, epoch_order(50, 0, seed=4))


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_positions_count_real_tokens(side):
    enc = [{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, {"input_ids": [8], "loss_mask": [1]},
           {"input_ids": [1, 2, 3, 4, 9], "loss_mask": [0, 0, 0, 1, 1]}]
    out = collate(enc, pad_id=99, pad_to=8, padding_side=side)
    assert out["tokens"].shape == (3, 8) and out["tokens"].dtype == np.int32 and out["positions"].dtype == np.int32
    assert out["attention_mask"].dtype == bool and out["loss_mask"].dtype == bool
    for row, e in enumerate(enc):
        n = len(e["input_ids"])
        real = out["attention_mask"][row]
        assert real.sum() == n
        idx = np.flatnonzero(real)
        assert idx.tolist() == (list(range(8 - n, 8)) if side == "left" else list(range(n)))
        assert out["tokens"][row, idx].tolist() == e["input_ids"]
        assert out["positions"][row, idx].tolist() == list(range(n))
        assert out["loss_mask"][row, idx].tolist() == [bool(m) for m in e["loss_mask"]]
        assert np.all(out["tokens"][row, ~real] == 99) and not out["loss_mask"][row, ~real].any()
    with pytest.raises(ValueError, match="pad_to=4"):
        collate(enc, pad_id=0, pad_to=4)


# ----------------------------------------------------------------------------- packed batches

@pytest.fixture(scope="module")
def authors_items_llama(tmp_path_factory):
    """The authors' KTO training file (sample, tests/fixtures/authors_data) as items, with the
    real Llama-3.1 tokenizer: half the items sit at or near max_length 512."""
    from lasa_jax.data.readers import read_kto_pairs
    from tests.authors_files import fixture
    from tests.real_models import load_real_tokenizer
    tok = load_real_tokenizer("llama3_1_instruct", str(tmp_path_factory.mktemp("llama")))
    pairs = read_kto_pairs(fixture("data/training/mixed_dpo_ultra_safety_converted.sample.json"))
    return pairs_to_items(pairs, z_mode="source", seed=0), tok


def _batches(items, tok, **kw):
    from lasa_jax.method.kto_data import KTOBatches
    return KTOBatches(items, tok, epochs=3, max_length=512, max_prompt_length=384, pad_id=0, **kw)


@pytest.mark.parametrize("grad_accum,multiple", [(1, 1), (2, 1), (1, 8)])
def test_packed_steps_hold_every_item_once_and_whole(authors_items_llama, grad_accum, multiple):
    """Each step's packed rows hold its B items (and B KL pairs) exactly once, each contiguous,
    with its own tokens and loss mask (the first token's loss dropped: its log-prob would come
    from the previous item); rows per micro-batch are a multiple of the data-parallel size."""
    items, tok = authors_items_llama
    data = _batches(items, tok, batch_size=16, grad_accum=grad_accum, row_multiple=multiple)
    for s in range(data.total_steps):
        b, idx = data.host_batch(s), data.indices(s)
        assert b["tokens"].shape == (grad_accum, data.step_rows[s][0], data.width)
        assert b["tokens"].shape[1] % multiple == 0 and b["kl_tokens"].shape[1] % multiple == 0
        for prefix, encoded in (("", [data.encoded[i] for i in idx]), ("kl_", data.kl_encoded(idx))):
            owner = b[prefix + "items"].reshape(-1, data.width)
            tokens = b[prefix + "tokens"].reshape(-1, data.width)
            loss = b[prefix + "loss_mask"].reshape(-1, data.width)
            assert sorted(set(owner[owner > 0].tolist())) == list(range(1, 17))
            for j, e in enumerate(encoded):
                rows, cols = np.nonzero(owner == j + 1)
                want = e["input_ids"][:data.length]
                assert len(set(rows.tolist())) == 1 and len(cols) == len(want)
                assert (np.diff(cols) == 1).all()
                assert tokens[rows[0], cols].tolist() == want
                assert loss[rows[0], cols].tolist() == [False] + [bool(x) for x in e["loss_mask"][1:data.length]]
            assert (tokens[owner == 0] == 0).all() and not loss[owner == 0].any()


def test_packing_the_authors_data_leaves_at_most_ten_percent_padding(authors_items_llama):
    """Issue 16's target on the authors' KTO file with the real tokenizer, 16 items per step on
    one device: items and KL pairs packed compute <= 10 % padding (measured 9.1 %), where one
    item per row padded to the batch's longest (TRL's collator) computes 21 %. With one compiled
    shape for the run (step_shapes=1), 19 %; with the default 8 shapes, 9.3 %."""
    items, tok = authors_items_llama
    data = _batches(items, tok, batch_size=16)
    trl_pad = trl_all = 0
    for s in range(data.total_steps):
        for kl in (False, True):
            p = data.padded(data.indices(s), kl=kl)
            trl_pad, trl_all = trl_pad + int((~p["attention_mask"]).sum()), trl_all + p["attention_mask"].size
    assert data.padding_fraction() <= 0.10
    assert trl_pad / trl_all > 0.18  # the comparison is not against an easy case
    assert len(data.shapes) <= 8
    one = _batches(items, tok, batch_size=16, step_shapes=1)
    assert len(one.shapes) == 1 and one.padding_fraction() >= data.padding_fraction()


def test_bad_step_shapes_is_a_config_error(authors_items_llama):
    from lasa_jax.errors import ConfigError
    items, tok = authors_items_llama
    with pytest.raises(ConfigError, match="config.align.step_shapes=0"):
        _batches(items, tok, batch_size=16, step_shapes=0)


@pytest.mark.parametrize("batch_size,multiple", [(16, 1), (64, 8)])
def test_reference_pass_packs_with_at_most_ten_percent_padding(authors_items_llama, batch_size, multiple):
    """The precomputed reference packs every item and every step's KL pairs together: on the
    authors' file 5.4 % / 7.4 % padding (TRL's per-batch padding: 21 %), each sequence exactly
    once, in a handful of shapes."""
    from lasa_jax.method.trainer import reference_batches
    items, tok = authors_items_llama
    data = _batches(items, tok, batch_size=batch_size)
    wanted, encoded, batches = reference_batches(data, range(data.total_steps), multiple)
    assert wanted == list(range(len(items))) and len(encoded) == len(items) + data.total_steps * batch_size
    assert sorted(i for b in batches for i, _, _ in b.items) == list(range(len(encoded)))
    real, computed = sum(len(e["input_ids"]) for e in encoded), sum(b.tokens.size for b in batches)
    assert 1 - real / computed <= 0.10
    assert len({b.tokens.shape for b in batches}) <= 8
    assert all(b.tokens.shape[0] % multiple == 0 for b in batches)


def test_choose_shapes_covers_every_need_with_at_most_limit_shapes():
    """Exact integer checks on random needs: every batch gets a shape >= its need in both
    columns, at most `limit` distinct shapes, 1 gives the column-wise maximum, and a larger
    limit never costs more."""
    from lasa_jax.model.packing import choose_shapes
    rng = np.random.default_rng(0)
    needs = rng.integers(4, 17, (200, 2))
    totals = []
    for limit in (1, 2, 4, 8, 1000):
        got = choose_shapes(needs, limit)
        assert (got >= needs).all() and len({tuple(g) for g in got}) <= limit
        totals.append(int(got.sum()))
    assert (choose_shapes(needs, 1) == needs.max(0)).all()
    assert totals == sorted(totals, reverse=True) and totals[-1] < totals[0]
