"""KV-cache generation against transformers' ``generate`` and against uncached recomputation.

All in float32 on CPU. Token-level comparisons are exact (greedy argmax on logits that agree to
~1e-6); the sampling-distribution check uses a 5-sigma binomial bound per token.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lasa_jax.infra import mesh as shd
from lasa_jax.model.checkpoint import unflatten
from lasa_jax.model.generate import _select_tokens, generate
from lasa_jax.model.lm import LanguageModel, load_model, pad_batch, param_shardings
from lasa_jax.model.tiny import tiny_model_config
from lasa_jax.model.transformer import KVCache, init_params
from tests.hf_models import make_hf_model, save_hf_model

NEW = 64
LENGTHS = (17, 5, 40)  # deliberately unsorted: results must come back in input order


@functools.lru_cache(maxsize=None)
def _checkpoint(variant, directory):
    hf = make_hf_model(variant)
    save_hf_model(hf, directory)
    return hf, load_model(directory, tokenizer=False)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gen")


def _models(variant, ckpt_dir):
    return _checkpoint(variant, str(ckpt_dir / variant))


def _prompts(seed=0, vocab=512):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, n).tolist() for n in LENGTHS]


def _hf_generate(hf, prompts, eos=None, new=NEW):
    """transformers greedy generate on a left-padded batch; new tokens per row, cut after eos."""
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)[:, T:].tolist()
    if eos is not None:  # transformers pads finished rows; keep up to and including the eos
        out = [row[:row.index(eos) + 1] if eos in row else row for row in out]
    return out


@pytest.mark.parametrize("variant", ["llama3_f8", "qwen2", "qwen3"])
def test_greedy_matches_transformers_generate(variant, ckpt_dir):
    hf, lm = _models(variant, ckpt_dir)
    prompts = _prompts()
    hf.generation_config.eos_token_id = None  # no stopping: compare all 64 tokens of every row
    ours = generate(lm, prompts, max_new_tokens=NEW, eos_ids=[], progress=False)
    ref = _hf_generate(hf, prompts)
    assert [len(r) for r in ours] == [NEW] * 3
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a == b, f"{variant} row {i}: first difference at step {next(j for j in range(NEW) if a[j] != b[j])}"


def test_eos_stops_each_row_like_transformers(ckpt_dir):
    hf, lm = _models("llama3_f8", ckpt_dir)
    prompts = _prompts()
    full = generate(lm, prompts, max_new_tokens=NEW, eos_ids=[], progress=False)
    eos = full[0][5]  # a token row 0 emits early; other rows may or may not emit it
    ours = generate(lm, prompts, max_new_tokens=NEW, eos_ids=[eos], progress=False)
    ref = _hf_generate(hf, prompts, eos=eos)
    assert ours == ref
    assert ours[0][-1] == eos and len(ours[0]) <= 6  # the EOS is kept, nothing after it
    # With every row stopping at step 0 the loop exits at once and returns one token each.
    firsts = sorted({r[0] for r in full})
    assert generate(lm, prompts, max_new_tokens=NEW, eos_ids=firsts, progress=False) == [[r[0]] for r in full]


def test_cached_decoding_equals_uncached_recomputation(ckpt_dir):
    _, lm = _models("qwen2", ckpt_dir)
    prompts, steps = _prompts(seed=3), NEW
    ours = generate(lm, prompts, max_new_tokens=steps, eos_ids=[], progress=False)

    # Reference: at each step run the full forward, no cache, over one fixed-length layout
    # [left pad | prompt | tokens so far | right pad] (mixed padding, real tokens masked in).
    T = max(map(len, prompts))
    L = T + steps
    tokens = np.zeros((3, L), np.int32)
    mask = np.zeros((3, L), bool)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p):T], mask[i, T - len(p):T] = p, True
    forward = jax.jit(lambda t, m: lm.module.apply({"params": lm.params}, t, m).logits)
    for s in range(steps):
        logits = np.asarray(forward(tokens, mask))[:, T + s - 1]
        tokens[:, T + s], mask[:, T + s] = logits.argmax(-1), True
    assert ours == tokens[:, T:].tolist()


def test_sampling_is_keyed_and_top_p_to_zero_is_greedy(ckpt_dir):
    _, lm = _models("llama3_f8", ckpt_dir)
    prompts, new = _prompts(seed=5), NEW
    run = lambda key, top_p=0.9: generate(lm, prompts, max_new_tokens=new, temperature=1.5,
                                          top_p=top_p, key=key, eos_ids=[], progress=False)
    a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    assert a == b
    assert a != c
    greedy = generate(lm, prompts, max_new_tokens=new, eos_ids=[], progress=False)
    assert run(jax.random.key(1), top_p=1e-9) == greedy
    # A prompt's sample depends on its index, not on its batch-mates or its row in the batch
    # (an extra, shorter prompt changes both for the first three).
    more = generate(lm, prompts + [[7, 8]], max_new_tokens=new, temperature=1.5, top_p=0.9,
                    key=jax.random.key(1), eos_ids=[], progress=False)
    assert more[:3] == a


def test_top_p_sampling_distribution_matches_numpy_nucleus():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=12).astype(np.float32) * 2
    temperature, top_p, n = 0.8, 0.7, 20000
    # NumPy reference (transformers' order: temperature, then the smallest set of most likely
    # tokens whose mass reaches top_p, renormalised).
    p = np.exp(logits / temperature - (logits / temperature).max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[: np.searchsorted(np.cumsum(p[order]), top_p) + 1]
    q = np.zeros_like(p)
    q[keep] = p[keep] / p[keep].sum()

    keys = jax.random.split(jax.random.key(0), n)
    rows = jnp.broadcast_to(jnp.asarray(logits), (n, logits.size))
    draw = jax.jit(_select_tokens)(rows, keys, True, jnp.float32(temperature), jnp.float32(top_p))
    counts = np.bincount(np.asarray(draw), minlength=logits.size)
    assert set(np.flatnonzero(counts)) == set(keep.tolist())
    sigma = np.sqrt(n * q * (1 - q))
    np.testing.assert_array_less(np.abs(counts - n * q), 5 * sigma + 1e-9)


def test_bad_input_is_a_clear_error(ckpt_dir):
    _, lm = _models("llama3_f8", ckpt_dir)
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        generate(lm, [[1, 2], []], progress=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(lm, [[1, 99999]], progress=False)
    with pytest.raises(ValueError, match="top_p"):
        generate(lm, [[1]], top_p=1.5, progress=False)


@pytest.mark.parametrize("mesh_shape,tensor", [((1, 8, 1), None), ((1, 4, 2), 2)])
def test_decode_layout_on_8_devices_is_token_identical(mesh_shape, tensor, ckpt_dir):
    """Greedy decoding with the weights resharded for decoding (replicated, or tensor-parallel)
    from an FSDP training layout gives the single-device tokens and transformers' tokens."""
    hf, single = _models("llama3_f8", ckpt_dir)
    sharded = load_model(str(ckpt_dir / "llama3_f8"), tokenizer=False, mesh=shd.make_mesh(*mesh_shape))
    decoding = sharded.for_decoding(tensor)
    assert decoding.mesh.shape["fsdp"] == 1 and decoding.mesh.shape["tensor"] == (tensor or 1)
    prompts = _prompts(seed=5)
    hf.generation_config.eos_token_id = None
    ours = generate(decoding, prompts, max_new_tokens=NEW, eos_ids=[], progress=False)
    assert ours == generate(single, prompts, max_new_tokens=NEW, eos_ids=[], progress=False)
    assert ours == _hf_generate(hf, prompts)


BF16_TIE = 0.05  # logit gap (float32 logits of a bf16 model) that a bf16 rounding can flip


def _deficit_at_divergence(lm, prompt, reference, candidate):
    """Where two greedy continuations of ``prompt`` first differ, teacher-forced on their common
    prefix: how far ``lm``'s logit of the ``candidate``'s token falls below its best logit (None
    when they never differ)."""
    k = next((i for i, (a, b) in enumerate(zip(reference, candidate)) if a != b), None)
    if k is None:
        return None
    seq = list(prompt) + list(candidate[:k])
    logits = np.asarray(lm.logits(np.asarray([seq], np.int32), np.ones((1, len(seq)), bool)))[0, -1]
    return float(logits.max() - logits[candidate[k]])


def test_decode_layout_bf16_matches_one_device_up_to_rounding_ties(ckpt_dir):
    """The paper models decode in bf16: the replicated decode layout, resharded from an FSDP
    layout on 8 devices, against one device's scanned (training-layout) model in bf16. The two
    are different XLA programs (unrolled per-layer weights, 1 row per device vs 8), so a bf16
    rounding may differ; greedy tokens must agree wherever the reference's choice is not a
    near-tie: at the first differing token the one-device training-layout model's best logit
    leads its logit of the decode layout's choice by at most BF16_TIE (a resharding error would show as a token it clearly rejects).
    The teacher-forced logits must agree to bf16 precision too (max |diff| <= 0.05, logits of
    magnitude ~1)."""
    path = str(ckpt_dir / "llama3_f8")
    _models("llama3_f8", ckpt_dir)  # writes the checkpoint
    single = load_model(path, dtype="bfloat16", tokenizer=False)
    sharded = load_model(path, dtype="bfloat16", tokenizer=False, mesh=shd.make_mesh(1, 8, 1))
    decoding = sharded.for_decoding(1)
    assert jax.tree.leaves(decoding.params)[0].dtype == jnp.bfloat16
    prompts = _prompts(seed=6)
    ours = generate(decoding, prompts, max_new_tokens=NEW, eos_ids=[], progress=False)
    theirs = generate(single, prompts, max_new_tokens=NEW, eos_ids=[], progress=False)  # 1 device
    for prompt, ref, row in zip(prompts, theirs, ours):
        deficit = _deficit_at_divergence(single, prompt, ref, row)
        assert deficit is None or deficit <= BF16_TIE, (deficit, ref, row)
    tokens, mask = pad_batch([p + row for p, row in zip(prompts, ours)], 0, padding_side="left",
                             batch_multiple=8)
    a, b = np.asarray(single.logits(tokens, mask)), np.asarray(decoding.logits(tokens, mask))
    np.testing.assert_allclose(b[mask], a[mask], atol=0.05, rtol=0)


def _decode_step_collective_fraction(lm, batch=8, slots=64):
    """Collective result bytes of one compiled decode step over the model's weight bytes. One
    layer, so that the layer scan's body (which the HLO text holds once) runs once per step."""
    assert lm.cfg.num_layers == 1
    tokens, mask = lm._place(np.ones((batch, 1), np.int32), np.ones((batch, 1), bool))
    module, cfg = lm.module, lm.cfg

    def step(params, tokens, mask):
        cache = KVCache.empty(cfg, batch, slots, lm.dtype)
        return module.apply({"params": params}, tokens, mask, cache=cache).logits

    hlo = jax.jit(step).lower(lm.params, tokens, mask).compile().as_text()
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(lm.params))
    return shd.collective_bytes(hlo) / weights


def test_decode_step_collectives_are_under_one_percent_of_weights():
    cfg = tiny_model_config("llama", 512, num_layers=1, num_heads=8, num_kv_heads=8)
    mesh = shd.make_mesh(1, 8, 1)
    params = jax.device_put(init_params(cfg, jax.random.key(0)), unflatten(param_shardings(cfg, mesh)))
    fsdp = LanguageModel(cfg, params, mesh=mesh)
    # The FSDP training layout all-gathers the weights every step: this is what the test catches.
    assert _decode_step_collective_fraction(fsdp) > 0.1
    assert _decode_step_collective_fraction(fsdp.for_decoding()) <= 0.01
    assert _decode_step_collective_fraction(fsdp.for_decoding(2)) <= 0.01


def test_collective_bytes_parses_sync_and_async_collectives():
    hlo = """
  %ag = bf16[8,64]{1,0} all-gather(bf16[1,64]{1,0} %p), replica_groups={}, dimensions={0}
  %ars = (f32[4]{0}, f32[4]{0}) all-reduce-start(f32[4]{0} %x), to_apply=%add
  %ard = f32[4]{0} all-reduce-done((f32[4]{0}, f32[4]{0}) %ars)
  %cp = s32[2,3]{1,0} collective-permute(s32[2,3]{1,0} %y), source_target_pairs={{0,1}}
  %d = f32[1000]{0} add(f32[1000]{0} %a, f32[1000]{0} %b)
"""
    # The async all-reduce counts its buffer once (its start's tuple holds operand and result).
    assert shd.collective_bytes(hlo) == 8 * 64 * 2 + 4 * 4 + 6 * 4
