"""All-layer last-token feature extraction: lasa_jax against transformers, same model, same batch.

    PYTHONPATH=. python bench/features.py [--batch 16] [--min-len 64] [--max-len 256] [--repeats 1]
                                          [--breakdown]

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
Throughput counts real (non-pad) tokens. The first call of each side (jit compile, torch warm-up)
is timed separately and excluded; torch uses as many threads as JAX's CPU backend has cores.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from lasa_jax.model.lm import load_model

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


def timed(fns: dict, repeats: int) -> dict:
    """name -> (first-call seconds, best timed seconds, output); timed calls are interleaved so
    that load from other processes on a shared machine hits every side alike."""
    out = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        res = fn()
        out[name] = [time.perf_counter() - t, float("inf"), res]
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            out[name][2] = fn()
            out[name][1] = min(out[name][1], time.perf_counter() - t)
    return out


def breakdown(cfg: dict, B: int, T: int, repeats: int = 3) -> None:
    """Where a forward's time goes: one layer's components at the bench shapes, XLA vs torch,
    best of ``repeats`` (random weights; the same ops both models run)."""
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
    print(f"\nper-layer components, best of {repeats} ({B * T} positions):")
    print(f"{'':<26} {'GFLOP':>6} {'XLA s':>7} {'torch s':>8} {'XLA GF/s':>9} {'torch GF/s':>10}")
    with torch.inference_mode():
        for name, fl, jf, args, tf in rows:
            tj = timed({"j": lambda: jf(*args)}, repeats)["j"][1]
            tt = timed({"t": tf}, repeats)["t"][1]
            print(f"{name:<26} {fl / 1e9:>6.1f} {tj:>7.3f} {tt:>8.3f} {fl / 1e9 / tj:>9.1f} {fl / 1e9 / tt:>10.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs after warm-up (best is kept)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time one layer's components (MLP, projections, attention, LM head)")
    args = ap.parse_args()

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
          f"({real / (B * T):.0%}); timed runs: {args.repeats}")

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
    res = timed(fns, args.repeats)
    ours = np.asarray(res["lasa_jax LanguageModel.features"][2])
    err = float(np.abs(ours - res["transformers CausalLM, hidden_states"][2].numpy()).max())

    print(f"{'':<38} {'warm-up':>9} {'timed':>8} {'tokens/s':>9} {'GFLOP':>6} {'GFLOP/s':>8}")
    for name, (first, t, _) in res.items():
        gf = forward_flops(MODEL, B, T, heads[name]) / 1e9
        print(f"{name:<38} {first:>8.3f}s {t:>7.3f}s {real / t:>9.0f} {gf:>6.0f} {gf / t:>8.1f}")
    ours_t = res["lasa_jax LanguageModel.features"][1]
    print(f"speed-up vs CausalLM (authors' path): "
          f"{res['transformers CausalLM, hidden_states'][1] / ours_t:.2f}x  (target >= 2x)")
    print(f"speed-up vs base model, no LM head:   "
          f"{res['transformers base model (no LM head)'][1] / ours_t:.2f}x")
    print(f"max |ours - transformers| over all {len(ours)} layers: {err:.2e} (float32)")
    if args.breakdown:
        breakdown(MODEL, B, T, max(3, args.repeats))


if __name__ == "__main__":
    main()
