"""Post-hoc diagnostic of world v4 (not a world, not a default, chosen after v4's results): is the
declared pretraining budget what kept the v4 model from learning the world?

    PYTHONPATH=. python bench/toy_v4_budget.py --seed 0 --steps 3600 [--out runs/v4_budget]

Pretrains world v4's model (v4's data stream, packing, optimiser, only `--steps` longer, with the
cosine schedule stretched to it) and, every `--every` steps, measures on 400 fresh answer
documents (teacher-forced, BOS + document, greedy next token): the accuracy of the answer's
first token (the tool f(v, o)) and of the answer's clause tokens after "then" (copies of the
request's object and person and the bare verb), by tier. The v4 build stops at 1200 steps.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax.numpy as jnp
import numpy as np

from lasa_jax.toyworld import world, world4
from lasa_jax.toyworld.build import BuildConfig, world_tokenizer
from lasa_jax.toyworld.train import TrainConfig, init_params, make_step, pack_stream


def probe_docs(seed: int, n: int = 400):
    """Fresh single answer documents (request + answer, one language, no anchors), drawn from the
    training split with a separate rng, half in the high tier and half in mid/low."""
    import random
    langs = world4.make_languages(seed)
    held = world4.held_out_facts(seed)
    train = world.split_queries(seed)["train"]
    rng = random.Random(f"toyworld-v4-budget-probe-{seed}")
    out = []
    for i in range(n):
        code = rng.choice(world.HIGH if i % 2 == 0 else world.TIERS["mid"] + world.TIERS["low"])
        q = rng.choice([q for q in train if (q.verb, q.obj) not in held[code]])
        out.append((code, langs[code].request(q.verb, q.obj, q.person), langs[code].answer(q.verb, q.obj, q.person),
                    langs[code].words["then"]))
    return out


def measure(model, params, tok, docs) -> dict:
    rows, tool_pos, clause_pos, tiers = [], [], [], []
    for code, req, ans, then in docs:
        r = tok(req)["input_ids"]
        a = tok(ans, add_special_tokens=False)["input_ids"]
        ids = r + a
        t = a.index(tok.convert_tokens_to_ids(then))
        rows.append(ids)
        tool_pos.append(len(r))  # the token at this position is the tool
        clause_pos.append(list(range(len(r) + t + 1, len(ids) - 1)))  # clause tokens, not the final END
        tiers.append("high" if code in world.HIGH else "mid/low")
    width = max(map(len, rows))
    x = np.full((len(rows), width), tok.pad_token_id, np.int32)
    for i, r in enumerate(rows):
        x[i, :len(r)] = r
    logits = model.apply({"params": params}, jnp.asarray(x)).logits
    pred = np.asarray(jnp.argmax(logits, -1))  # pred[:, t] predicts token t + 1
    out = {}
    for tier in ("high", "mid/low"):
        idx = [i for i, t in enumerate(tiers) if t == tier]
        tool = np.mean([pred[i, tool_pos[i] - 1] == x[i, tool_pos[i]] for i in idx])
        cl = np.mean([pred[i, p - 1] == x[i, p] for i in idx for p in clause_pos[i]])
        out[tier] = {"tool_acc": float(tool), "clause_acc": float(cl)}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3600)
    p.add_argument("--every", type=int, default=600)
    p.add_argument("--out", default="runs/v4_budget")
    a = p.parse_args(argv)
    from lasa_jax.model.transformer import Transformer
    from lasa_jax.model.tiny import tiny_model_config
    cfg = BuildConfig.for_version(4, seed=a.seed)
    tok = world_tokenizer(a.seed, 4)
    mcfg = tiny_model_config("llama", len(tok), hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                             num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size)
    tcfg = TrainConfig(steps=a.steps, batch_size=cfg.pretrain.batch_size, learning_rate=cfg.pretrain.learning_rate,
                       warmup_steps=cfg.pretrain.warmup_steps)
    n_rows = a.steps * tcfg.batch_size
    docs = world4.pretraining_documents(a.seed, n_tokens=n_rows * cfg.seq_len_pretrain)
    x, m, _, _ = pack_stream(tok, docs, cfg.seq_len_pretrain, n_rows)
    model = Transformer(mcfg)
    params = init_params(mcfg, a.seed)
    step, tx = make_step(mcfg, tcfg)
    opt = tx.init(params)
    order = np.random.default_rng(a.seed).permutation(n_rows)
    probes = probe_docs(a.seed)
    log, t0 = [], time.time()
    for i in range(a.steps):
        idx = order[i * tcfg.batch_size:(i + 1) * tcfg.batch_size]
        params, opt, loss = step(params, opt, jnp.asarray(x[idx]), jnp.asarray(m[idx]))
        if (i + 1) % a.every == 0:
            row = {"step": i + 1, "loss": float(loss), "seconds": round(time.time() - t0, 1), **measure(model, params, tok, probes)}
            log.append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"seed{a.seed}_steps{a.steps}.json"), "w") as f:
        json.dump(log, f, indent=1)


if __name__ == "__main__":
    main()
