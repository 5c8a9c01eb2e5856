"""Greedy decode throughput: lasa_jax.model.generate against transformers' generate, same checkpoint.

    PYTHONPATH=. python bench/generate.py [--batch 8] [--prompt-len 64] [--new 128]

A random LLaMA-shaped checkpoint (~37M parameters, float32) is written with transformers'
save_pretrained and loaded by both sides; prompts are random ids of mixed lengths, left-padded;
no EOS stopping, so both produce exactly batch x new tokens. CPU, torch limited to 2 threads.
Timing through bench/_timing.py: one warm-up call per side (our jit compilation) reported on its
own, then the two sides alternated for --rounds rounds; the ratio is the median over rounds with
its min-max, withheld when the load average exceeds the core count.
"""
import argparse
import os
import tempfile
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

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
    _timing.add_arguments(ap)
    args = ap.parse_args()
    session = _timing.Session.from_args(args, "generate")
    torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory() as tmp:
        hf = make_checkpoint(tmp, args.vocab, args.hidden, args.layers)
        n_params = sum(p.numel() for p in hf.parameters())
        lm = load_model(tmp, tokenizer=False)
    rng = np.random.default_rng(0)
    lengths = np.linspace(args.prompt_len // 2, args.prompt_len, args.batch).astype(int)
    prompts = [rng.integers(1, args.vocab, n).tolist() for n in lengths]
    kw = dict(max_new_tokens=args.new, eos_ids=[], batch_size=args.batch, progress=False)

    T = int(lengths.max())
    ids = torch.zeros(args.batch, T, dtype=torch.long)
    mask = torch.zeros(args.batch, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    hf.generation_config.eos_token_id = None

    def reference():
        with torch.no_grad():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=args.new, do_sample=False,
                               pad_token_id=0)[:, T:].tolist()

    n_tok = args.batch * args.new
    print(f"{n_params / 1e6:.1f}M params float32, batch {args.batch}, prompts {lengths.min()}-{T} "
          f"tokens, {args.new} new tokens per row; torch threads {args.torch_threads}")
    res = session.compare("greedy decoding", {"lasa_jax": lambda: generate(lm, prompts, **kw),
                                              "transformers": reference}, work=n_tok, unit="tokens")
    ours, ref = res.outputs["lasa_jax"], res.outputs["transformers"]
    same = sum(a == b for a, b in zip(ours, ref))
    print(f"rows with identical tokens: {same}/{args.batch}")
    return session.finish(extra={"identical_rows": same, "rows": args.batch})


if __name__ == "__main__":
    sys.exit(main())
