"""Greedy decode throughput: lasa_jax.model.generate against transformers' generate, same checkpoint.

    PYTHONPATH=. python bench/generate.py [--batch 8] [--prompt-len 64] [--new 128]

A random LLaMA-shaped checkpoint (~37M parameters, float32) is written with transformers'
save_pretrained and loaded by both sides; prompts are random ids of mixed lengths, left-padded;
no EOS stopping, so both produce exactly batch x new tokens. CPU, torch limited to 2 threads.
Our first call (jit compilation + run) is reported separately; the ratio uses a second,
compiled call. One timed run each (the machine is shared; rerun for a spread).
"""
import argparse
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from lasa_jax.model.generate import generate  # noqa: E402
from lasa_jax.model.lm import load_model  # noqa: E402


def make_checkpoint(directory, vocab, hidden, layers, seed=0):
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64, help="longest prompt; others are shorter")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--torch-threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory() as tmp:
        hf = make_checkpoint(tmp, args.vocab, args.hidden, args.layers)
        n_params = sum(p.numel() for p in hf.parameters())
        lm = load_model(tmp, tokenizer=False)
    rng = np.random.default_rng(0)
    lengths = np.linspace(args.prompt_len // 2, args.prompt_len, args.batch).astype(int)
    prompts = [rng.integers(1, args.vocab, n).tolist() for n in lengths]
    kw = dict(max_new_tokens=args.new, eos_ids=[], batch_size=args.batch, progress=False)

    t = time.perf_counter()
    generate(lm, prompts, **kw)
    first = time.perf_counter() - t
    t = time.perf_counter()
    ours = generate(lm, prompts, **kw)
    ours_t = time.perf_counter() - t

    T = int(lengths.max())
    ids = torch.zeros(args.batch, T, dtype=torch.long)
    mask = torch.zeros(args.batch, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        t = time.perf_counter()
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=args.new, do_sample=False,
                          pad_token_id=0)[:, T:].tolist()
        hf_t = time.perf_counter() - t

    n_tok = args.batch * args.new
    same = sum(a == b for a, b in zip(ours, ref))
    print(f"{n_params / 1e6:.1f}M params float32, batch {args.batch}, prompts {lengths.min()}-{T} "
          f"tokens, {args.new} new tokens per row; torch threads {args.torch_threads}")
    print(f"lasa_jax     : {n_tok / ours_t:8.1f} tokens/s ({ours_t:.2f} s; first call incl. "
          f"compile {first:.2f} s)")
    print(f"transformers : {n_tok / hf_t:8.1f} tokens/s ({hf_t:.2f} s)")
    print(f"ratio ours/transformers: {hf_t / ours_t:.2f}x   (rows with identical tokens: {same}/{args.batch})")


if __name__ == "__main__":
    main()
