"""All-layer last-token feature extraction: lasa_jax against transformers, same model, same batch.

    PYTHONPATH=. python bench/features.py [--batch 16] [--min-len 64] [--max-len 256] [--rounds 5] [--json PATH]
                                          [--prompts 128] [--breakdown]

Model: a random LLaMA-shaped checkpoint (~60M parameters: hidden 512, 8 layers, 8 heads / 4 KV
heads, MLP 1536, vocab 32000) written locally with ``save_pretrained`` and loaded by both sides
in float32. Batch: ``--batch`` prompts of random length in [min-len, max-len], right-padded.

Ours: ``LanguageModel.features(tokens, mask)`` (every layer 0..L, no LM head, one jitted call).
Reference (the authors' code path): ``LlamaForCausalLM(..., output_hidden_states=True)`` then the
hidden state at each row's last real token, per layer. The same forward without the LM head
(``model.model``) is timed too, so the ratio can be read with and without that extra work, and
so is our own full forward with the LM head (``LanguageModel.logits``): with the analytic FLOP
count of each call, the GFLOP/s column shows whether a difference comes from doing less work or
from doing it faster.
Prompt set (``--prompts``): the same comparison over a whole set, each side with its own loop:
MultiJail prompts' real lengths (Llama-3.1 chat template, real tokenizer; random ids of those
lengths), ours through ``features_of_ids`` (prompts packed several to a row, segments kept
apart), the authors' in input order, each batch right-padded to its longest prompt.
Throughput counts real (non-pad) tokens. Timing through bench/_timing.py: the first call of each
side (jit compile, torch warm-up) is reported on its own, then the sides alternate for --rounds
rounds; ratios are medians over rounds with their min-max, withheld when the load average exceeds
the core count. torch uses as many threads as JAX's CPU backend has cores.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import sys

import jax
import numpy as np
import torch
import transformers

from lasa_jax.model.lm import load_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
             rms_norm_eps=1e-5, tie_word_embeddings=False,
             rope_parameters=dict(rope_type="default", rope_theta=500000.0))


def make_checkpoint(directory: str, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODEL)).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def make_batch(batch: int, min_len: int, max_len: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, size=batch)
    T = -(-int(lengths.max()) // 16) * 16  # the same 16-token bucket lasa_jax's encode uses
    tokens = np.zeros((batch, T), np.int32)
    mask = np.zeros((batch, T), bool)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(1, vocab, size=n)
        mask[i, :n] = True
    return tokens, mask


def multijail_lengths(n: int, seed: int = 0) -> list[int]:
    """Token lengths of ``n`` MultiJail prompts (a seeded sample over all languages), chat-templated
    with the real Llama-3.1-Instruct tokenizer: the length mix a LASA run meets."""
    import json
    from tests.real_models import load_real_tokenizer
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests", "fixtures",
                        "authors_data", "examples", "multijail_1k.json")
    with open(path, encoding="utf-8") as f:
        prompts = [r["prompt"] for r in json.load(f)]
    pick = np.random.default_rng(seed).choice(len(prompts), size=n, replace=False)
    with tempfile.TemporaryDirectory(prefix="bench-tok-") as d:
        tok = load_real_tokenizer("llama3_1_instruct", d)
        texts = [tok.apply_chat_template([{"role": "user", "content": prompts[i]}], tokenize=False,
                                         add_generation_prompt=True) for i in pick]
        return [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]


def authors_features(model, ids: list[list[int]], batch: int) -> np.ndarray:
    """(L+1, N, d): the authors' loop over a prompt set: batches in input order, each padded to
    its longest prompt (right), a CausalLM forward with every hidden state, the last real token."""
    out = []
    for i in range(0, len(ids), batch):
        chunk = ids[i:i + batch]
        T = max(map(len, chunk))
        tok = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for r, x in enumerate(chunk):
            tok[r, :len(x)], mask[r, :len(x)] = torch.tensor(x), 1
        out.append(hf_features(model, tok, mask, mask.sum(1) - 1).numpy())
    return np.concatenate(out, axis=1)


def hf_features(model, tokens: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """(L+1, B, d): the authors' recipe, a full forward with every hidden state returned."""
    with torch.inference_mode():
        out = model(input_ids=tokens, attention_mask=mask, output_hidden_states=True)
        rows = torch.arange(tokens.shape[0])
        return torch.stack([h[rows, last] for h in out.hidden_states])


def forward_flops(cfg: dict, B: int, T: int, lm_head: bool) -> float:
    """Matmul FLOPs of one padded forward (both sides compute every padded position, and both
    run masked full-square attention)."""
    d, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    per_token = L * (2 * d * d + 2 * d * kv + 3 * d * f) + (d * cfg["vocab_size"] if lm_head else 0)
    return 2.0 * B * T * per_token + 4.0 * B * T * T * d * L


def breakdown(cfg: dict, B: int, T: int, rounds: int = 3) -> None:
    """Where a forward's time goes: one layer's components at the bench shapes, XLA vs torch,
    median of ``rounds`` alternated rounds (random weights; the same ops both models run)."""
    import jax.numpy as jnp
    d, f, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = d // H
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s, dtype=np.float32) * 0.02
    x, wg, wu, wd, wp, wh = r(B * T, d), r(d, f), r(d, f), r(f, d), r(d, 2 * d + 2 * KV * hd), r(d, V)
    q, k = r(B, T, H, hd), r(B, T, KV, hd)
    mask = np.broadcast_to(np.tril(np.ones((T, T), bool)), (B, 1, T, T))
    jx, jq, jk, jm = map(jnp.asarray, (x, q, k, mask))
    tx, twg, twu, twd, twp, twh = map(torch.from_numpy, (x, wg, wu, wd, wp, wh))
    # HF's sdpa path repeats the KV heads, then calls torch's SDPA in (B, H, T, hd) layout.
    tq = torch.from_numpy(q).transpose(1, 2)
    tk = torch.from_numpy(k).transpose(1, 2).repeat_interleave(H // KV, dim=1)
    tm = torch.from_numpy(np.ascontiguousarray(mask))
    def jit(fn):
        compiled = jax.jit(fn)
        return lambda *a: compiled(*a).block_until_ready()
    rows = [
        ("MLP gate/up/down", 6 * B * T * d * f, jit(lambda x: (jax.nn.silu(x @ wg) * (x @ wu)) @ wd), (jx,),
         lambda: (torch.nn.functional.silu(tx @ twg) * (tx @ twu)) @ twd),
        ("q/k/v/o projections", 2 * B * T * d * (2 * d + 2 * KV * hd), jit(lambda x: x @ wp), (jx,),
         lambda: tx @ twp),
        (f"masked attention T={T}", 4 * B * T * T * d,
         jit(lambda q, k, m: jax.nn.dot_product_attention(q, k, k, mask=m)), (jq, jk, jm),
         lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tk, attn_mask=tm)),
        ("LM head (HF path only)", 2 * B * T * d * V, jit(lambda x: x @ wh), (jx,), lambda: tx @ twh),
    ]
    print(f"\nper-layer components, median of {rounds} alternated rounds ({B * T} positions):")
    print(f"{'':<26} {'GFLOP':>6} {'XLA s':>7} {'torch s':>8} {'XLA GF/s':>9} {'torch GF/s':>10}")
    with torch.inference_mode():
        for name, fl, jf, args, tf in rows:
            c = _timing.compare(name, {"xla": lambda: jf(*args), "torch": tf}, rounds=rounds)
            tj, tt = c.median("xla"), c.median("torch")
            print(f"{name:<26} {fl / 1e9:>6.1f} {tj:>7.3f} {tt:>8.3f} {fl / 1e9 / tj:>9.1f} {fl / 1e9 / tt:>10.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=128,
                    help="prompt-set comparison: this many MultiJail prompt lengths (0 = skip)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time one layer's components (MLP, projections, attention, LM head)")
    _timing.add_arguments(ap)
    args = ap.parse_args()
    session = _timing.Session.from_args(args, "features")

    # XLA's CPU backend runs its intra-op pool on every core this process may use.
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory(prefix="bench-features-") as d:
        hf = make_checkpoint(d)
        lm = load_model(d, dtype="float32", tokenizer=False)
    n_params = sum(p.numel() for p in hf.parameters())
    tokens, mask = make_batch(args.batch, args.min_len, args.max_len, MODEL["vocab_size"])
    B, T = tokens.shape
    real = int(mask.sum())
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}, {len(jax.devices())} device(s)), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}; attn_implementation={hf.config._attn_implementation}")
    print(f"model: {n_params / 1e6:.1f}M params, float32; batch {B} x {T} padded, {real} real tokens "
          f"({real / (B * T):.0%})")

    t_tok, t_mask = torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))
    last = torch.from_numpy(T - 1 - np.argmax(mask[:, ::-1], axis=1))
    fns = {
        "lasa_jax LanguageModel.features": lambda: lm.features(tokens, mask).block_until_ready(),
        "transformers CausalLM, hidden_states": lambda: hf_features(hf, t_tok, t_mask, last),
        "transformers base model (no LM head)": lambda: hf_features(hf.model, t_tok, t_mask, last),
        "lasa_jax LanguageModel.logits": lambda: lm.logits(tokens, mask).block_until_ready(),
    }
    heads = {"lasa_jax LanguageModel.features": False, "transformers CausalLM, hidden_states": True,
             "transformers base model (no LM head)": False, "lasa_jax LanguageModel.logits": True}
    res = session.compare("all-layer features", fns, work=real, unit="tokens")
    ours = np.asarray(res.outputs["lasa_jax LanguageModel.features"])
    err = float(np.abs(ours - res.outputs["transformers CausalLM, hidden_states"].numpy()).max())
    # GFLOP/s per side says whether a difference is less work or the same work done faster.
    for name in fns:
        gf = forward_flops(MODEL, B, T, heads[name]) / 1e9
        print(f"{name:<38} {gf:>6.0f} GFLOP  {gf / res.median(name):>8.1f} GFLOP/s")
    print("target: >= 2x the authors' path (transformers CausalLM, hidden_states)")
    print(f"max |ours - transformers| over all {len(ours)} layers: {err:.2e} (float32)")
    extra = {"max_abs_diff": err, "real_tokens": real, "padded_tokens": B * T}
    if args.prompts:
        extra.update(prompt_set(session, lm, hf, args))
    if args.breakdown:
        breakdown(MODEL, B, T, max(3, args.rounds))
    return session.finish(extra=extra)


def prompt_set(session, lm, hf, args) -> dict:
    """Every prompt of a set through each side's whole loop: ours packs several prompts per row
    (lasa_jax.model.features.features_of_ids), the authors' pads batches in input order."""
    from lasa_jax.model.features import features_of_ids
    from lasa_jax.model.packing import pack
    lengths = multijail_lengths(args.prompts)
    rng = np.random.default_rng(1)
    ids = [rng.integers(1, MODEL["vocab_size"], n).tolist() for n in lengths]
    real = sum(lengths)
    ours_slots = sum(b.tokens.size for b in pack(ids, rows=args.batch, pad_id=0))
    theirs_slots = sum(len(ids[i:i + args.batch]) * max(lengths[i:i + args.batch])
                       for i in range(0, len(ids), args.batch))
    print(f"\nprompt set: {len(ids)} MultiJail prompts (Llama-3.1 chat template lengths {min(lengths)}-"
          f"{max(lengths)}, median {int(np.median(lengths))}), {real} real tokens, batches of {args.batch}; "
          f"padding: ours (packed) {1 - real / ours_slots:.1%} of {ours_slots} positions, "
          f"authors' (input order, padded to the batch's longest) {1 - real / theirs_slots:.1%} of {theirs_slots}")
    res = session.compare("prompt set", {
        "lasa_jax features_of_ids (packed)": lambda: features_of_ids(lm, ids, batch_size=args.batch, progress=False),
        "authors' loop (transformers CausalLM)": lambda: authors_features(hf, ids, args.batch),
    }, work=real, unit="tokens")
    err = float(np.abs(res.outputs["lasa_jax features_of_ids (packed)"]
                       - res.outputs["authors' loop (transformers CausalLM)"]).max())
    print("target: >= 2x the authors' path")
    print(f"max |ours - transformers| over all prompts and layers: {err:.2e} (float32)")
    return {"prompt_set_max_abs_diff": err, "prompt_set_real_tokens": real,
            "prompt_set_padding_ours": 1 - real / ours_slots, "prompt_set_padding_authors": 1 - real / theirs_slots}


if __name__ == "__main__":
    sys.exit(main())
