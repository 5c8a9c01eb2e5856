"""Post-hoc diagnostic of v4-planted (chosen after its seed-0 result, not a world): does the
planted alignment hold for prompts read alone, only for a second side that can see the first, or
is it a collapse (unrelated queries as close as translations)?

    PYTHONPATH=. python bench/toy_planted_shortcut.py --model runs/v4p/seed0/model [--layer 4]

For the 12 bottleneck queries x the nine non-en languages: cos between the layer-k states at the
request ends of the en side and the other side (a) inside one parallel document "A = B" (as the
planted term was trained; en first or second), and (b) for the two requests each read alone (the
feature LASA uses). Prints the mean cos of each and of unrelated pairs (different queries) as a
baseline.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--layer", type=int, default=4)
    a = p.parse_args(argv)
    import jax.numpy as jnp
    from lasa_jax.model.lm import load_model
    from lasa_jax.model.transformer import Transformer
    lm = load_model(a.model)
    tok, model = lm.tokenizer, Transformer(lm.cfg)
    recs = json.load(open(os.path.join(a.model, "data", "parallel_prompts.json"), encoding="utf-8"))

    texts = []

    def add(text, positions):
        ids = tok(text)["input_ids"]
        texts.append(ids)
        return [(len(texts) - 1, i) for i in positions(ids)]

    pairs = {"in_document": [], "alone": [], "alone_other_query": []}
    for i, r in enumerate(recs):
        en = r["texts"]["en"]
        other_rec = recs[(i + 1) % len(recs)]
        for c, t in r["texts"].items():
            if c == "en":
                continue
            for first, second in ((en, t), (t, en)):
                n1 = len(tok(first, add_special_tokens=False)["input_ids"])
                pairs["in_document"].append(add(f"{first} = {second}", lambda ids: [n1, len(ids) - 1]))
            u = add(en, lambda ids: [len(ids) - 1])[0]
            v = add(t, lambda ids: [len(ids) - 1])[0]
            w = add(other_rec["texts"][c], lambda ids: [len(ids) - 1])[0]
            pairs["alone"].append([u, v])
            pairs["alone_other_query"].append([u, w])
    width = max(map(len, texts))
    x = np.full((len(texts), width), tok.pad_token_id, np.int32)
    mask = np.zeros((len(texts), width), bool)
    for i, ids in enumerate(texts):
        x[i, :len(ids)], mask[i, :len(ids)] = ids, True
    h = np.asarray(model.apply({"params": lm.params}, jnp.asarray(x), jnp.asarray(mask), capture="full").hidden[a.layer],
                   np.float64)
    cos = lambda p, q: float(h[p] @ h[q] / np.linalg.norm(h[p]) / np.linalg.norm(h[q]))
    out = {k: float(np.mean([cos(*pq) for pq in v])) for k, v in pairs.items()}
    print(json.dumps({"model": a.model, "layer": a.layer, "mean_cos": out, "n_alone_pairs": len(pairs["alone"])}))


if __name__ == "__main__":
    main()
