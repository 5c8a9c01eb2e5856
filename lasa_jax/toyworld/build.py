"""Regenerate the toy world and its checkpoint from a seed.

    python -m lasa_jax.toyworld.build --out lasa_jax/assets/toy_model --seed 0 [--variant v4-planted]

Variants: v1, v2, v3, v4, v4-planted (world.py declares each); the default is the shipped one
(SHIPPED_VARIANT). `--world-version N [--planted]` is the older spelling.

Writes an HF checkpoint directory (config.json, safetensors, word-level tokenizer with chat
template, generation_config.json) plus `toyworld.json` (the seed, the sizes, the training losses)
and the LASA data files under `data/` (see `export.write_data_files`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time

import numpy as np

from lasa_jax.infra.fileio import publish_dir
from lasa_jax.model.tiny import tiny_model_config
from lasa_jax.toyworld import world
from lasa_jax.toyworld.tokenizer import build_word_tokenizer, words_of
from lasa_jax.toyworld.train import TrainConfig, encode_chats, encode_documents, init_params, train


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Sizes and schedules of one build; the defaults are world v3's. `for_version` gives each
    version's own (v1/v2 rebuild bit for bit with theirs)."""
    seed: int = 0
    hidden_size: int = 64
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 192
    pretrain_docs: int = 40000
    pretrain: TrainConfig = TrainConfig(steps=2000, batch_size=32, learning_rate=3e-3, warmup_steps=100)
    # v3's helpful-only instruction phase (world.instruct_examples); skipped before v3.
    instruct_examples: int = 6000
    instruct: TrainConfig = TrainConfig(steps=300, batch_size=32, learning_rate=1e-3, warmup_steps=20)
    # The safety SFT (world.sft_examples): v1/v2's only post-training phase, v3's second.
    sft_examples: int = 6000
    sft: TrainConfig = TrainConfig(steps=200, batch_size=32, learning_rate=5e-4, warmup_steps=20)
    seq_len_pretrain: int = 32
    seq_len_sft: int = 48
    world_version: int = 3
    # v4-planted (world.py): lambda * (1 - cos) at layer planted_layer between the two request
    # ends of parallel request documents; 0 = off (every other world).
    planted_lambda: float = 0.0
    planted_layer: int = -1

    @classmethod
    def for_version(cls, version: int, planted: bool = False, **overrides) -> "BuildConfig":
        world.check_version(version)
        if planted and version != 4:
            raise ValueError(f"world_version={version}: the planted control exists for v4 only")
        if version < 3:  # v1/v2: 1000 pretraining steps, one SFT phase at 1e-3
            overrides = {"pretrain": TrainConfig(steps=1000, batch_size=32, learning_rate=3e-3, warmup_steps=100),
                         "sft": TrainConfig(steps=300, batch_size=32, learning_rate=1e-3, warmup_steps=20),
                         **overrides}
        if version == 4:  # world.py, v4 change 8 (pretrain_docs unused: the stream fills the rows)
            overrides = {"num_layers": 8, "pretrain_docs": 0,
                         "pretrain": TrainConfig(steps=1200, batch_size=24, learning_rate=3e-3, warmup_steps=100),
                         "instruct": TrainConfig(steps=200, batch_size=32, learning_rate=1e-3, warmup_steps=20),
                         "sft": TrainConfig(steps=150, batch_size=32, learning_rate=5e-4, warmup_steps=20),
                         "seq_len_pretrain": 64, "seq_len_sft": 64,
                         **({"planted_lambda": 1.0, "planted_layer": 4} if planted else {}), **overrides}
        return cls(world_version=version, **overrides)

    @property
    def variant(self) -> str:
        return f"v{self.world_version}" + ("-planted" if self.planted_lambda > 0 else "")

    @classmethod
    def for_variant(cls, variant: str, **overrides) -> "BuildConfig":
        if variant not in VARIANTS:
            raise ValueError(f"variant {variant!r}: expected one of {VARIANTS}")
        return cls.for_version(int(variant[1]), planted=variant.endswith("-planted"), **overrides)


VARIANTS = ("v1", "v2", "v3", "v4", "v4-planted")
# The build behind lasa_jax/assets/toy_model (seed 0), the embedded default's checkpoint.
SHIPPED_VARIANT = "v3"


def world_tokenizer(seed: int, version: int = 1):
    if version == 4:
        from lasa_jax.toyworld import world4
        return build_word_tokenizer(world4.all_tokens(world4.make_languages(seed)) | words_of(world4.extra_texts()))
    langs = world.make_languages(seed)
    words = set().union(*(world.language_tokens(l) for l in langs.values()))
    return build_word_tokenizer(words | words_of(world.extra_texts()) | {".", "="})


def build(out: str, cfg: BuildConfig = BuildConfig(), *, log_every: int = 200, save_dtype=np.float32,
          measure_sft: bool = True) -> dict:
    from lasa_jax.model.checkpoint import save_params
    from lasa_jax.model.config import to_hf_dict
    from lasa_jax.toyworld.export import write_data_files

    world.check_version(cfg.world_version)
    t0 = time.time()
    tok = world_tokenizer(cfg.seed, 4 if cfg.world_version == 4 else 1)
    model_cfg = tiny_model_config("llama", len(tok), hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                                  num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                                  intermediate_size=cfg.intermediate_size)
    losses = {}
    params = init_params(model_cfg, cfg.seed)
    if cfg.world_version == 4:
        params, pre_losses, packing = _pretrain_v4(cfg, model_cfg, tok, params, log_every)
        losses["packing"] = packing
    else:
        docs = world.pretraining_corpus(cfg.seed, cfg.pretrain_docs, cfg.world_version)
        x, m = encode_documents(tok, docs, cfg.seq_len_pretrain)
        params, pre_losses = train(model_cfg, params, x, m, cfg.pretrain, seed=cfg.seed, log_every=log_every, name="pretrain")
    t_pre = time.time() - t0
    if cfg.world_version >= 3:
        ins = world.instruct_examples(cfg.seed, cfg.instruct_examples, cfg.world_version)
        x, m = encode_chats(tok, ins, cfg.seq_len_sft)
        params, ins_losses = train(model_cfg, params, x, m, cfg.instruct, seed=cfg.seed + 2, log_every=log_every,
                                   name="instruct")
        losses["instruct_loss_first_last"] = _first_last(ins_losses)
    sft = world.sft_examples(cfg.seed, cfg.sft_examples, cfg.world_version)
    x, m = encode_chats(tok, sft, cfg.seq_len_sft)
    params, sft_losses = train(model_cfg, params, x, m, cfg.sft, seed=cfg.seed + 1, log_every=log_every, name="sft")

    measured = measure(model_cfg, params, tok, cfg.seed, cfg.world_version) if measure_sft else None
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    hf = to_hf_dict(model_cfg, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id)
    save_params(params, model_cfg, tmp, hf_config=hf, dtype=save_dtype)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                   "pad_token_id": tok.pad_token_id, "do_sample": False}, f, indent=1)
    write_data_files(os.path.join(tmp, "data"), cfg.seed, version=cfg.world_version)
    info = {"seed": cfg.seed, "world_version": cfg.world_version, "variant": cfg.variant,
            "build_config": dataclasses.asdict(cfg), "vocab_size": len(tok),
            "pretrain_loss_first_last": _first_last(pre_losses), **losses,
            "sft_loss_first_last": _first_last(sft_losses),
            "sft_model_per_language": measured,
            "seconds": {"pretrain": round(t_pre, 1), "total": round(time.time() - t0, 1)}}
    with open(os.path.join(tmp, "toyworld.json"), "w") as f:
        json.dump(info, f, indent=1)
    publish_dir(tmp, out)
    return info


def _pretrain_v4(cfg: BuildConfig, model_cfg, tok, params, log_every: int):
    """World v4's pretraining (change 8): a fresh document stream packed into exactly
    steps x batch rows of seq_len_pretrain tokens, one pass; v4-planted adds its term."""
    from lasa_jax.toyworld import world4
    from lasa_jax.toyworld.train import pack_stream
    n_rows = cfg.pretrain.steps * cfg.pretrain.batch_size
    docs = world4.pretraining_documents(cfg.seed, n_tokens=n_rows * cfg.seq_len_pretrain)
    x, m, pairs, valid = pack_stream(tok, docs, cfg.seq_len_pretrain, n_rows)
    packing = {"documents": len(docs), "rows": n_rows, "planted_pairs_per_row": float(valid.sum(1).mean())}
    if cfg.planted_lambda > 0:
        aux: list = []
        params, losses = train(model_cfg, params, x, m, cfg.pretrain, seed=cfg.seed, log_every=log_every,
                               name="pretrain", planted=(pairs, valid, cfg.planted_layer, cfg.planted_lambda),
                               aux_losses=aux)
        packing["planted_align_first_last"] = _first_last(aux)
    else:
        params, losses = train(model_cfg, params, x, m, cfg.pretrain, seed=cfg.seed, log_every=log_every, name="pretrain")
    return params, losses, packing


def _first_last(losses: list[float]) -> list[float]:
    return [losses[0], float(np.mean(losses[-50:]))]


def measure(model_cfg, params, tok, seed: int, version: int = 1) -> dict:
    """Per-language judgement of the tuned model's greedy replies on the evaluation split; for
    v2 also with the refusal prefix forced ("with_prefix"), which is what LASA's gate does."""
    from lasa_jax.toyworld.export import eval_prompts
    from lasa_jax.toyworld.judge import ToyJudge, summarize
    from lasa_jax.toyworld.sample import greedy_replies
    prompts = eval_prompts(seed, version)
    judge = ToyJudge(seed, version)
    replies = greedy_replies(model_cfg, params, tok, prompts)
    judged = [judge.judge_one(p, r) for p, r in zip(prompts, replies)]
    out = summarize(judged)
    if version == 1:
        return out
    replies = greedy_replies(model_cfg, params, tok, prompts, prefix=True)
    res = {"plain": out, "with_prefix": summarize(judge.judge_one(p, r) for p, r in zip(prompts, replies))}
    if version == 4:
        from lasa_jax.toyworld.judge import fact_accuracy
        res["fact_accuracy"] = fact_accuracy(judged, seed)
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", default=SHIPPED_VARIANT, choices=VARIANTS)
    p.add_argument("--world-version", type=int, choices=world.WORLD_VERSIONS,
                   help="older spelling: overrides --variant (v4 with --planted: v4-planted)")
    p.add_argument("--planted", action="store_true", help="with --world-version 4: the positive control")
    a = p.parse_args(argv)
    if a.world_version is not None:
        cfg = BuildConfig.for_version(a.world_version, planted=a.planted, seed=a.seed)
    else:
        cfg = BuildConfig.for_variant(a.variant, seed=a.seed)
    info = build(a.out, cfg)
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
