"""The checks that need a GPU, in one process (run by bench/gpu_suite.sh; see its header).

    PYTHONPATH=. python bench/gpu_suite.py            # on a GPU: ~5 minutes on an H200
    PYTHONPATH=. python bench/gpu_suite.py --dry-run  # on CPU: every part at toy shapes

1. parity: bf16 vs float32 logits at a Llama-3.2-1B shape (random weights, float32 masters cast
   to bf16): max |log_softmax difference| and top-1 agreement over 4 x 512 tokens.
2. align MFU at the Llama-3.2-1B and -3B shapes: the paper config's align step (bf16 compute,
   float32 masters, remat full, 16 x 512 tokens), mean step time after warm-up; MFU = the
   analytic floor FLOPs of bench/roofline.py (train_floors) / time / the chip's bf16 peak.
3. decode: ``generate`` of 64 x 512-token prompts, 512 new tokens (no EOS), tokens/s against
   the HBM roofline (weights + mean live KV cache read per step, bench/roofline.decode_floors).
4. memory: ``peak_bytes_in_use`` after the 3B align steps vs ``lasa_jax.infra.fitcheck``.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import time

DRY = "--dry-run" in sys.argv
# Before JAX starts: bench/roofline.py would otherwise default the platform to CPU.
os.environ["JAX_PLATFORMS"] = "cpu" if DRY else os.environ.get("JAX_PLATFORMS", "cuda")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lasa_jax.config import base_config  # noqa: E402
from lasa_jax.infra import fitcheck  # noqa: E402
from lasa_jax.infra.mesh import make_mesh  # noqa: E402
from lasa_jax.method.trainer import Trainer, batch_shapes, peak_flops  # noqa: E402
from lasa_jax.model.config import ModelConfig  # noqa: E402
from lasa_jax.model.generate import generate  # noqa: E402
from lasa_jax.model.lm import LanguageModel  # noqa: E402
from lasa_jax.model.transformer import init_params  # noqa: E402

_spec = importlib.util.spec_from_file_location("roofline", os.path.join(os.path.dirname(__file__), "roofline.py"))
roofline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(roofline)

# Llama-3.2 1B / 3B (config.json facts; tied embeddings).
SHAPES = {
    "1B": ModelConfig(family="llama", vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
                      num_kv_heads=8, head_dim=64, intermediate_size=8192, tie_embeddings=True),
    "3B": ModelConfig(family="llama", vocab_size=128256, hidden_size=3072, num_layers=28, num_heads=24,
                      num_kv_heads=8, head_dim=128, intermediate_size=8192, tie_embeddings=True),
}
TOY = ModelConfig(family="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, intermediate_size=128, tie_embeddings=True)
HBM = {"H200": 4.8e12, "H100": 3.35e12}


def _params(cfg, dtype, seed=0):
    return jax.jit(lambda k: init_params(cfg, k, dtype=dtype))(jax.random.key(seed))


def parity(cfg, batch, length) -> dict:
    p32 = _params(cfg, jnp.float32)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, length), dtype=np.int32)
    mask = np.ones_like(tokens, bool)
    ref = LanguageModel(cfg, p32).logits(tokens, mask)
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
    got = LanguageModel(cfg, p16, dtype="bfloat16", param_dtype="bfloat16").logits(tokens, mask)
    diff = jnp.max(jnp.abs(jax.nn.log_softmax(ref) - jax.nn.log_softmax(got)))
    top1 = jnp.mean(jnp.argmax(ref, -1) == jnp.argmax(got, -1))
    return {"max_abs_logsoftmax_diff": float(diff), "top1_agreement": float(top1)}


def _host_batch(shapes, cfg, rng):
    out = {}
    for k, s in shapes.items():
        if s.dtype == jnp.int32:
            out[k] = rng.integers(0, cfg.vocab_size, s.shape, dtype=np.int32)
        elif s.dtype == jnp.bool_:
            out[k] = np.ones(s.shape, bool)
        else:
            out[k] = rng.normal(-50.0, 5.0, s.shape).astype(np.float32)
    out["desirable"] = rng.random(out["desirable"].shape) < 0.5
    for k in ("items", "kl_items"):  # full rows, one item each (the layout's worst case)
        a, rows, _ = shapes[k].shape
        out[k] = np.broadcast_to(1 + np.arange(a * rows, dtype=np.int32).reshape(a, rows, 1), shapes[k].shape).copy()
    return out


def align_mfu(cfg, *, batch, length, steps, warmup) -> dict:
    a = base_config().align
    a.batch_size, a.max_length = batch, length
    mesh = make_mesh(1, -1, 1)
    lm = LanguageModel(cfg, _params(cfg, jnp.bfloat16), mesh=mesh, dtype="bfloat16",
                       param_dtype="bfloat16", remat="full")
    trainer = Trainer(lm, a, total_steps=1000, per_step_reference=False)
    masters, opt = trainer.init_state(lm.params)
    lm.params = None  # the align stage releases the base weights before training too
    host = _host_batch(batch_shapes(batch, 1, length), cfg, np.random.default_rng(0))
    for i in range(warmup):
        masters, opt, metrics = trainer.step(masters, opt, host, i)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for i in range(steps):
        masters, opt, metrics = trainer.step(masters, opt, host, warmup + i)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / steps
    floor = roofline.train_floors(cfg, batch=batch, length=length, remat="full", compute_bytes=2)
    peak = peak_flops()
    est = fitcheck.estimate(cfg, stage="align", mesh_shape={"data": 1, "fsdp": mesh.size, "tensor": 1},
                            batch_size=batch, seq_len=length, remat="full")
    return {"step_s": step_s, "floor_tflops": floor["flops"] / 1e12,
            "mfu": floor["flops"] / step_s / peak if peak else None,
            "fitcheck_gib": est.total / 2 ** 30, "loss_finite": bool(np.isfinite(float(metrics["loss"])))}


def decode(cfg, *, batch, prompt, new) -> dict:
    lm = LanguageModel(cfg, _params(cfg, jnp.bfloat16), mesh=make_mesh(1, -1, 1), dtype="bfloat16",
                       param_dtype="bfloat16")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, prompt).tolist() for _ in range(batch)]
    run = lambda: generate(lm, prompts, max_new_tokens=new, eos_ids=[], batch_size=batch, progress=False)
    run()  # compile
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    # Mean live slots over the decode steps: prompt + new / 2.
    floor = roofline.decode_floors(cfg, batch=batch, live=prompt + new // 2, param_bytes=2, cache_bytes=2)
    hbm = next((v for k, v in HBM.items() if k in jax.devices()[0].device_kind), None)
    out = {"tokens_per_s": batch * new / seconds, "seconds": seconds}
    if hbm:
        out["hbm_roofline_tokens_per_s"] = batch / (floor["bytes"] / hbm)
        out["fraction_of_roofline"] = out["tokens_per_s"] / out["hbm_roofline_tokens_per_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="toy shapes on CPU: checks the code paths only")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    dev = jax.devices()[0]
    if not args.dry_run and dev.platform != "gpu":
        sys.exit(f"gpu_suite: no GPU (JAX sees {dev.platform}: {dev.device_kind}); use --dry-run on CPU")
    shapes = {"1B": TOY, "3B": dataclasses.replace(TOY, num_layers=3)} if args.dry_run else SHAPES
    b, T, n = (8, 32, 8) if args.dry_run else (16, 512, 512)
    lines = [f"gpu_suite on {jax.device_count()} x {dev.device_kind} (jax {jax.__version__})"
             + (" DRY RUN, toy shapes" if args.dry_run else "")]

    def report(name, fn, *a, **kw):
        t0 = time.perf_counter()
        try:
            res = fn(*a, **kw)
        except Exception as e:  # one failed part should not hide the others' numbers
            res = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
        cells = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items())
        lines.append(f"  {name:<18} {cells}  [{time.perf_counter() - t0:.0f} s]")
        print(lines[-1], file=sys.stderr, flush=True)
        return res

    report("parity 1B", parity, shapes["1B"], 4 if not args.dry_run else 2, T)
    report("decode 1B", decode, shapes["1B"], batch=64 if not args.dry_run else 8, prompt=T, new=n)
    report("align MFU 1B", align_mfu, shapes["1B"], batch=b, length=T, steps=args.steps, warmup=2)
    res = report("align MFU 3B", align_mfu, shapes["3B"], batch=b, length=T, steps=args.steps, warmup=2)
    stats = dev.memory_stats() or {}
    if "peak_bytes_in_use" in stats and "fitcheck_gib" in res:
        peak = stats["peak_bytes_in_use"] / 2 ** 30
        lines.append(f"  {'memory 3B align':<18} peak_bytes_in_use={peak:.2f} GiB, fitcheck={res['fitcheck_gib']:.2f} GiB, "
                     f"fit/peak={res['fitcheck_gib'] / peak:.2f}")
    else:
        lines.append(f"  {'memory 3B align':<18} no peak_bytes_in_use on {dev.platform}")
    print("\n".join(["=" * 20 + " gpu_suite summary " + "=" * 20, *lines]))


if __name__ == "__main__":
    main()
