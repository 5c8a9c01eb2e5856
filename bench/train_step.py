"""Latent-KTO training step: lasa_jax (jit, 1 CPU device) vs a PyTorch step of the same objective.

    PYTHONPATH=. python bench/train_step.py [--steps 10] [--batch 8] [--threads 2] [--sizes hidden_size=512,...]

Both sides train the same tiny random LLaMA checkpoint (configs/tiny.py sizes) on the same
batches of the project's KTO fixture (ours packed, PyTorch's one item per row padded to the
batch's longest, as TRL's collator does) with AdamW + grad-norm clipping; the PyTorch side is
transformers' LlamaForCausalLM with TRL's KTO formula written out (policy forward/backward on the
items, no-grad policy forward on the KL pairs, reference log-probs precomputed for both). Batches
are built before timing, and every step shape is compiled by one untimed pass first.
Also reported: our step with the reference recomputed every step ("per_step") against the
precomputed reference. Timing through bench/_timing.py: the three sides alternate round by round
(--rounds), each round runs --warmup-steps untimed steps then --steps timed ones from fresh
state; ratios are medians over rounds with min-max, withheld when the load exceeds the cores.
tokens/s counts the real (non-pad) tokens of the trained sequences.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402


def _args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first, in every round")
    p.add_argument("--batch", type=int, default=8, help="items per step")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--sizes", default="",
                   help="model sizes over configs/tiny.py's, e.g. hidden_size=512,num_layers=8,num_heads=8,"
                        "num_kv_heads=4,intermediate_size=1536 (the vocabulary stays the fixture tokenizer's)")
    _timing.add_arguments(p)
    p.set_defaults(warmup=0)  # each round runs its own untimed --warmup-steps first
    return p.parse_args()


def main():
    args = _args()
    import jax
    import torch
    import transformers

    from configs.tiny import get_config
    from lasa_jax.method.kto_data import KTOBatches
    from lasa_jax.method.trainer import Trainer, reference_logps
    from lasa_jax.stages import align as train
    from lasa_jax.data.readers import read_kto_pairs
    from lasa_jax.model.lm import load_model
    from lasa_jax.context import resolve_data_path
    from lasa_jax.infra.mesh import make_mesh
    from lasa_jax.model.tiny import make_tiny_checkpoint

    cfg = get_config()
    a = cfg.align
    workdir = tempfile.mkdtemp(prefix="bench-train-")
    sizes = cfg.model.tiny.to_dict()
    for item in filter(None, args.sizes.split(",")):
        name, value = item.split("=")
        if name not in sizes or name == "family":
            raise SystemExit(f"--sizes: unknown size {name!r}; choose from {sorted(set(sizes) - {'family'})}")
        sizes[name] = int(value)
    path = make_tiny_checkpoint(os.path.join(workdir, "model"), seed=0, **sizes)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    lm = load_model(path, mesh=mesh)
    pairs = read_kto_pairs(resolve_data_path(cfg.data.kto_pairs))
    items = train.make_items(pairs, a, seed=0)
    n_steps = args.warmup_steps + args.steps
    data = KTOBatches(items, lm.tokenizer, batch_size=args.batch, grad_accum=1, seed=0, max_steps=n_steps,
                      max_length=args.max_length, max_prompt_length=a.max_prompt_length, pad_id=lm.pad_id,
                      attention_cost=lm.cfg.attention_cost())
    # Reference log-probs of the steps we run only (the full fixture would take longer than the bench).
    trainer = Trainer(lm, a, total_steps=n_steps, per_step_reference=False)
    t0 = time.perf_counter()
    data.ref_logps, data.ref_kl_logps = reference_logps(trainer, lm.params, data, steps=range(n_steps))
    precompute_s = time.perf_counter() - t0
    batches = [data.host_batch(s) for s in range(n_steps)]
    tokens = [int((b["items"] > 0).sum()) for b in batches]
    timed_tokens = sum(tokens[args.warmup_steps:])
    computed = sum(b[k].size for b in batches for k in ("items", "kl_items"))
    real = sum(int((b[k] > 0).sum()) for b in batches for k in ("items", "kl_items"))
    # The PyTorch side gets TRL's layout: one item per row, padded to the longest in its batch.
    padded = [(data.padded(data.indices(s)), data.padded(data.indices(s), kl=True)) for s in range(n_steps)]
    trl_computed = sum(m["tokens"].size + k["tokens"].size for m, k in padded)

    trainers = {per_step: Trainer(lm, a, total_steps=n_steps, per_step_reference=per_step)
                for per_step in (False, True)}

    def time_jax(per_step: bool) -> _timing.Measured:
        # One Trainer per variant, so later rounds reuse its compiled step; fresh state each round.
        tr = trainers[per_step]
        ref = lm.params if per_step else None  # init_state copies: the step never donates lm.params
        params, opt = tr.init_state(lm.params)
        for s in range(n_steps):
            if s == args.warmup_steps:
                jax.block_until_ready(params)
                t = time.perf_counter()
            params, opt, m = tr.step(params, opt, batches[s], s, ref)
            float(m["loss"])  # the training loop reads the loss every step too
        jax.block_until_ready(params)
        return _timing.Measured(time.perf_counter() - t)

    def time_torch() -> _timing.Measured:
        torch.set_num_threads(args.threads)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=a.learning_rate, weight_decay=a.weight_decay)
        beta = a.beta

        def logps(tok, mask, loss_mask):
            logits = model(input_ids=tok, attention_mask=mask).logits[:, :-1].float()
            lp = torch.gather(logits.log_softmax(-1), 2, tok[:, 1:, None]).squeeze(2)
            return (lp * loss_mask[:, 1:]).sum(-1)

        tb = []
        for b, (m, k) in zip(batches, padded):
            t = {p + "tokens": torch.from_numpy(x["tokens"]).long() for p, x in (("", m), ("kl_", k))}
            t.update({p + "mask": torch.from_numpy(x["attention_mask"]).long() for p, x in (("", m), ("kl_", k))})
            t.update({p + "loss_mask": torch.from_numpy(x["loss_mask"]).float() for p, x in (("", m), ("kl_", k))})
            t.update({n: torch.from_numpy(np.asarray(b[n])) for n in ("desirable", "ref_logps", "ref_kl_logps")})
            tb.append(t)
        for s, b in enumerate(tb):
            if s == args.warmup_steps:
                t = time.perf_counter()
            with torch.no_grad():
                kl = (logps(b["kl_tokens"], b["kl_mask"], b["kl_loss_mask"]) - b["ref_kl_logps"]).mean().clamp(min=0)
            r = logps(b["tokens"], b["mask"], b["loss_mask"]) - b["ref_logps"]
            d = b["desirable"]
            loss = torch.where(d, 1 - torch.sigmoid(beta * (r - kl)), 1 - torch.sigmoid(beta * (kl - r))).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
            opt.step()
            float(loss.detach())
        return _timing.Measured(time.perf_counter() - t)

    print(f"\nLatent-KTO step, LLaMA (d={lm.cfg.hidden_size}, L={lm.cfg.num_layers}, MLP {lm.cfg.intermediate_size}, "
          f"vocab={lm.cfg.vocab_size}, {sum(x.size for x in jax.tree.leaves(lm.params)) / 1e6:.1f}M params), "
          f"batch {args.batch}, items <= {data.length} tokens, {args.steps} timed steps per round after "
          f"{args.warmup_steps} untimed, device {jax.devices()[0].device_kind}; work = real tokens of the timed "
          f"steps\npadding (items + KL pairs, all steps): lasa_jax packed {1 - real / computed:.1%} in "
          f"{len(data.shapes)} step shape(s) {data.shapes}; PyTorch/TRL padded per batch {1 - real / trl_computed:.1%}")
    for per_step in (False, True):  # compile every step shape before anything is timed
        time_jax(per_step)
    session = _timing.Session.from_args(args, "train_step")
    session.compare("Latent-KTO steps", {
        "lasa_jax, precomputed reference": lambda: time_jax(False),
        f"PyTorch (transformers, {args.threads} threads)": time_torch,
        "lasa_jax, per-step reference": lambda: time_jax(True),
    }, work=timed_tokens, unit="tokens")
    print(f"(precomputing these {n_steps} steps' reference took {precompute_s:.2f}s, compile included)")
    return session.finish(extra={"precompute_s": precompute_s, "timed_tokens": timed_tokens,
                                 "padding_packed": 1 - real / computed, "padding_trl": 1 - real / trl_computed})


if __name__ == "__main__":
    sys.exit(main())
