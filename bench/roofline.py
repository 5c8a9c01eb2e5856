"""Roofline of the paper models from XLA's compiled costs on 8 simulated CPU devices (issue 16).

    PYTHONPATH=. python bench/roofline.py [--models qwen3-8b,...] [--json OUT] [--batch 64]

No GPU is needed and no weight is allocated: every input is a ``jax.ShapeDtypeStruct`` with its
sharding, and each program is lowered and compiled for the paper config's default mesh
(``configs/<model>.py``: data 1, fsdp = all 8 devices, tensor 1). From the compiled program we
read ``cost_analysis()`` (FLOPs and bytes accessed, *per device*: the SPMD-partitioned program is
what one device runs) and the optimised HLO text (every all-gather / reduce-scatter / all-reduce /
all-to-all / collective-permute and its shapes). Three programs per model:

1. **align step** (``lasa_jax.method.trainer.Trainer.lower``, the path of
   ``lasa_jax.infra.fitcheck``'s cross-check): the config's align settings (batch 16 x 512, bf16
   compute from float32 masters and AdamW moments, precomputed reference) under the config's
   remat policy ("full") and, for comparison, "none".
2. **decode step**: one step of the ``while_loop`` body of ``lasa_jax.model.generate``, through the
   adapter ``decode_step_fn`` below; batch 64, a cache of 1024 slots (512 prompt + 512 new), its
   index at 768 (mid-generation); on ``LanguageModel.for_decoding``'s copy (mesh (data, 1,
   tensor), one weight tree and one cache array per layer, blocks unrolled); ``--decode-layout
   train`` for the training model (FSDP mesh, stacked weights and cache), the layout before.
3. **features** (``LanguageModel._features_fn``: capture "last", no logits), batch 64 x 512.

**While loops.** XLA's cost analysis counts a ``while`` body once, whatever its trip count (this
script's ``--check-while`` prints the evidence: a scanned 1-, 2- and 4-layer model report the same
FLOPs). The layer scan is a while loop, so each program is compiled with the scan fully unrolled
(``Transformer.scan_unroll=True``; the decode copy is unrolled already) for 1 and 2 layers and
every cost is extrapolated linearly in depth: cost(L) = c(1) + (L - 1) * (c(2) - c(1)). The decoder
layers are identical, so this is exact up to XLA's fusion choices; tests/test_roofline.py checks it
against an unrolled 4-layer compile (the training layout's decode step is the exception: it grows
faster than linearly, see below).

**Floors** (N = matmul parameters: q, k, v, o, gate, up, down of every layer plus the LM head;
not the embedding, a lookup, nor norms and biases; B x T tokens; n heads of size hd; L layers;
attn = 2*B*T^2*n*hd*L, the FLOPs of QK^T and PV of one causal forward, i.e. half the dense square):

- train FLOPs: 6*N*B*T + 3*attn for forward and backward of the batch, plus 2*N*B*T + attn for
  the policy forward of the KL pairs that Latent KTO runs every step (TRL does the same). Remat
  recompute is not in the floor. ``train_flops_ratio`` = XLA FLOPs (x 8 devices) / floor.
- train collectives (FSDP minimum, bytes of the full buffers, compute dtype c): every parameter
  gathered for the forward, again for the backward, once more when a remat policy recomputes the
  forward, and its gradient reduce-scattered: P*c*(2 + [remat != none]) + P*c, P = all
  parameters. ``train_collective_ratio`` = XLA collective bytes per device / floor.
- decode bytes: every weight read once (the embedding only for the B looked-up rows) plus the
  live K/V (2*L*B*768*kv_heads*hd*c). ``decode_bytes_ratio`` on the decode layout = XLA bytes
  accessed per device / (weights / tensor + K/V / devices), what one device must read; on the
  training layout = XLA bytes accessed (x 8) / floor. On the training layout XLA:CPU copies each
  layer's weights and cache out of the stacked arrays, and that step's cost grows faster than
  linearly in depth, so its extrapolation under-counts (see tests/test_roofline.py).
  ``decode_collective_fraction`` = XLA collective bytes per device per step / weight bytes.
- features FLOPs: 2*(N - LM head)*B*T + attn. ``features_flops_ratio`` = XLA FLOPs (x 8) / floor.

Collective bytes of one op (``lasa_jax.infra.mesh.collectives``) are the size of the whole buffer
it assembles or reduces, as one device sees it: an all-gather's result, a reduce-scatter's operand (result x group size), an all-reduce's,
all-to-all's or collective-permute's result. This matches the floor's unit (one gather of a
parameter = its full size).

**Projections** for H100 and H200 (bf16 dense peak 989 TFLOP/s; HBM 3.35 / 4.8 TB/s), per device:
``train_mfu_upper_bound`` = (floor FLOPs / 8 / peak) / max(XLA FLOPs / peak, XLA bytes / HBM);
``decode_tokens_per_s_upper_bound`` = B / (XLA bytes per device per step / HBM). Interconnect time
is left out (collectives assumed fully overlapped), so both are upper bounds.

**Caveat: XLA's CPU backend.** It has no bf16 GEMM and converts bf16 matmul operands to float32,
so bytes accessed include float32 copies an accelerator does not make (a bf16 decode step reads
each weight as bf16, writes it as float32 and reads that: ~5x the bf16 weight bytes; ``--dtype
float32`` shows the program's own traffic); FLOPs and collectives do not depend on that. XLA's
cost analysis also counts the embedding lookup (a gather of B rows) as a read of the whole table
(checked: a gather of 8 rows of a 128256 x 4096 float32 table reports 2.1 GB); that is in the
decode bytes (an in-place cache update is counted as its slot only). Attention runs XLA's dense implementation (full T x T, masked), as on CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import resource
import sys
import time

# Must precede the first JAX import: the mesh needs 8 (simulated) devices.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from lasa_jax.infra import mesh as shd  # noqa: E402
from lasa_jax.infra.fitcheck import dtype_bytes  # noqa: E402
from lasa_jax.method.trainer import Trainer, abstract_model, batch_shapes  # noqa: E402
from lasa_jax.model.lm import unstacked_shardings  # noqa: E402
from lasa_jax.model.transformer import KVCache, unstack_layers  # noqa: E402


def decode_step_fn(module, params, cur, cur_valid, cache):
    """One decode step as the while-loop body of ``generate._build_generate_fn`` runs it (greedy
    token choice included), on whatever mesh its params are placed (see ``decode_program``).
    generate builds that body inside its jitted loop; this is the one place to follow it."""
    res = module.apply({"params": params}, cur[:, None], cur_valid[:, None], cache=cache)
    return jnp.argmax(res.logits[:, 0], axis=-1).astype(jnp.int32), res.cache


GPUS = {"H100": {"peak_flops": 989e12, "hbm_bytes_s": 3.35e12},
        "H200": {"peak_flops": 989e12, "hbm_bytes_s": 4.8e12}}
def compiled_cost(lowered) -> dict:
    t0 = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca  # older JAX: one dict per program
    text = compiled.as_text()
    coll = shd.collectives(text)
    return {"flops": float(ca.get("flops", 0.0)), "bytes": float(ca.get("bytes accessed", 0.0)),
            "collective_bytes": float(sum(c["bytes"] for c in coll.values())),
            "collectives": coll, "while_loops": text.count(" while("), "compile_s": seconds}


def extrapolate(c1: dict, c2: dict, layers: int) -> dict:
    """cost(L) = c(1) + (L-1) * (c(2) - c(1)) for every additive number (see the docstring)."""
    lin = lambda a, b: a + (layers - 1) * (b - a)
    out = {k: lin(c1[k], c2[k]) for k in ("flops", "bytes", "collective_bytes")}
    out["collectives"] = {k: {f: lin(c1["collectives"][k][f], c2["collectives"][k][f])
                              for f in ("count", "bytes", "f32_bytes")} for k in shd.COLLECTIVES}
    out["compile_s"] = c1["compile_s"] + c2["compile_s"]
    return out


def depth_cost(build, cfg) -> dict:
    """``build(cfg with n layers)`` -> lowered program with an unrolled layer scan, for n = 1, 2,
    extrapolated to ``cfg.num_layers``."""
    c1, c2 = (compiled_cost(build(dataclasses.replace(cfg, num_layers=n))) for n in (1, 2))
    if c1["while_loops"] or c2["while_loops"]:
        print(f"warning: {c1['while_loops']}/{c2['while_loops']} while loop(s) left after unrolling "
              "the layer scan: their bodies are counted once", file=sys.stderr)
    return extrapolate(c1, c2, cfg.num_layers)


def _unrolled_model(cfg, mesh, dtype, param_dtype, remat="none"):
    lm = abstract_model(cfg, mesh, dtype=dtype, param_dtype=param_dtype, remat=remat)
    lm.module = lm.module.clone(scan_unroll=True)
    return lm


def _sharded_params(lm):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        lm.params, lm.param_shardings)


# ------------------------------------------------------------------ the three programs
def train_program(cfg, mesh, *, dtype, param_dtype, remat, acfg):
    lm = _unrolled_model(cfg, mesh, dtype, param_dtype, remat)
    precomputed = acfg.reference == "precomputed"
    trainer = Trainer(lm, acfg, total_steps=1000, per_step_reference=not precomputed)
    return trainer.lower(batch_shapes(acfg.batch_size, acfg.grad_accum, acfg.max_length,
                                      precomputed=precomputed))


def decode_program(cfg, mesh, *, dtype, param_dtype, batch, slots, layout):
    """One decode step mid-generation. ``layout`` "decode": as ``generate`` runs it, on
    ``LanguageModel.for_decoding``'s copy (one weight tree and one cache array per layer, the
    blocks unrolled); "train": on the training model (stacked weights and cache, scanned layers,
    here unrolled for the cost analysis)."""
    lm = _unrolled_model(cfg, mesh, dtype, param_dtype)
    S = jax.ShapeDtypeStruct
    spec = lambda axes, shape: NamedSharding(mesh, shd.logical_spec(axes, shape, mesh))
    layer_shape = (batch, slots, cfg.num_kv_heads, cfg.head_dim)
    dt = jnp.dtype(lm.dtype)
    params = _sharded_params(lm)
    if layout == "decode":
        module = lm.module.clone(scan_layers=False)
        sh = unstacked_shardings(cfg, mesh)
        params = jax.tree.map(lambda x, s: S(x.shape, x.dtype, sharding=s),
                              jax.eval_shape(functools.partial(unstack_layers, num_layers=cfg.num_layers),
                                             params), sh)
        kv_sh = spec(("batch", "length", "kv_heads", "head_dim"), layer_shape)
        kv = tuple(S(layer_shape, dt, sharding=kv_sh) for _ in range(cfg.num_layers))
        kv_out = (kv_sh,) * cfg.num_layers
    else:
        module = lm.module
        kv_shape = (cfg.num_layers, *layer_shape)
        kv_out = spec(("layers", "batch", "length", "kv_heads", "head_dim"), kv_shape)
        kv = S(kv_shape, dt, sharding=kv_out)
    cache = KVCache(kv, kv, S((batch, slots), jnp.bool_, sharding=spec(("batch", "length"), (batch, slots))),
                    S((), jnp.int32, sharding=shd.replicated(mesh)))
    row = shd.batch_sharding(mesh, 1)
    cur, valid = S((batch,), jnp.int32, sharding=row), S((batch,), jnp.bool_, sharding=row)
    cache_sh = KVCache(kv_out, kv_out, cache.key_valid.sharding, cache.index.sharding)
    # The cache is donated and keeps its sharding, as a while-loop carry does.
    fn = jax.jit(decode_step_fn, static_argnums=0, donate_argnums=4, out_shardings=(row, cache_sh))
    return fn.lower(module, params, cur, valid, cache)


def features_program(cfg, mesh, *, dtype, param_dtype, batch, length):
    lm = _unrolled_model(cfg, mesh, dtype, param_dtype)
    sh = shd.batch_sharding(mesh)
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=sh)
    mask = jax.ShapeDtypeStruct((batch, length), jnp.bool_, sharding=sh)
    return lm._features_fn.lower(_sharded_params(lm), tokens, mask, tuple(range(cfg.num_layers + 1)))


# ------------------------------------------------------------------ floors
def matmul_params(cfg) -> int:
    """N: parameters that take part in a matmul (all layers' projections and the LM head)."""
    d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return cfg.num_layers * (2 * d * q + 2 * d * kv + 3 * d * cfg.intermediate_size) + d * cfg.vocab_size


def causal_attention_flops(cfg, batch: int, length: int) -> float:
    """QK^T and PV of one causal forward over all layers (half of the dense T x T)."""
    return 2.0 * batch * length ** 2 * cfg.num_heads * cfg.head_dim * cfg.num_layers


def train_floors(cfg, *, batch, length, remat, compute_bytes) -> dict:
    n, tok = matmul_params(cfg), batch * length
    attn = causal_attention_flops(cfg, batch, length)
    weights = cfg.num_params() * compute_bytes
    gathers = 2 + (remat != "none")
    return {"flops": 8.0 * n * tok + 4 * attn, "collective_bytes": float(weights * (gathers + 1))}


def decode_floors(cfg, *, batch, live, param_bytes, cache_bytes) -> dict:
    d = cfg.hidden_size
    weights = (cfg.num_params() - cfg.vocab_size * d + batch * d) * param_bytes
    kv = 2 * cfg.num_layers * batch * live * cfg.num_kv_heads * cfg.head_dim * cache_bytes
    return {"weight_bytes": float(weights), "kv_bytes": float(kv), "bytes": float(weights + kv)}


def features_floor(cfg, *, batch, length) -> float:
    n = matmul_params(cfg) - cfg.hidden_size * cfg.vocab_size
    return 2.0 * n * batch * length + causal_attention_flops(cfg, batch, length)


# ------------------------------------------------------------------ per model
def measure(name: str, args) -> dict:
    from lasa_jax.infra.mesh import mesh_from_config
    from lasa_jax.presets import KNOWN_MODELS, paper_model_config

    c = paper_model_config(name)
    arch, m, a = KNOWN_MODELS[name], c.model, c.align
    mesh = mesh_from_config(c.mesh)
    devices = mesh.size
    if args.dtype:  # XLA:CPU has no bf16 dot and upcasts around it; float32 shows the program's own traffic
        m.dtype = m.param_dtype = args.dtype
    kw = dict(dtype=m.dtype, param_dtype=m.param_dtype)
    c_bytes, p_bytes = dtype_bytes(m.dtype), dtype_bytes(m.param_dtype)
    row: dict = {"model": name, "params_b": arch.num_params() / 1e9, "layers": arch.num_layers,
                 "mesh": dict(mesh.shape), "devices": devices}

    # The config's policy ("full" in every paper config), "full" if it ever differs, and any
    # policy asked for with --also-remat (each costs one more pair of compiles).
    remats = list(dict.fromkeys([m.remat, "full", *args.also_remat]))
    row["train"] = {}
    for remat in remats:
        cost = depth_cost(lambda cf, r=remat: train_program(cf, mesh, remat=r, acfg=a, **kw), arch)
        floor = train_floors(arch, batch=a.batch_size, length=a.max_length, remat=remat,
                             compute_bytes=c_bytes)
        row["train"][remat] = {"xla": cost, "floor": floor,
                               "flops_ratio": cost["flops"] * devices / floor["flops"],
                               "collective_ratio": cost["collective_bytes"] / floor["collective_bytes"]}
    train = row["train"][m.remat]
    row["train_remat"] = m.remat
    row["train_flops_ratio"] = train["flops_ratio"]
    row["train_collective_ratio"] = train["collective_ratio"]

    # generate() decodes on LanguageModel.for_decoding's mesh: (data, 1, tensor) over the same
    # devices, tensor chosen by the same rule from the weight bytes and --device-gb.
    tensor, dmesh = mesh.shape["tensor"], mesh
    if args.decode_layout == "decode":
        tensor = shd.decode_tensor_size(int(arch.num_params() * p_bytes), devices, mesh.shape["tensor"],
                                        int(args.device_gb * 2**30))
        dmesh = shd.decode_mesh(mesh, tensor)
    dec = depth_cost(lambda cf: decode_program(cf, dmesh, batch=args.batch, slots=args.slots,
                                               layout=args.decode_layout, **kw), arch)
    dfloor = decode_floors(arch, batch=args.batch, live=args.live, param_bytes=p_bytes, cache_bytes=c_bytes)
    row["decode"] = {"xla": dec, "floor": dfloor, "batch": args.batch, "slots": args.slots, "live": args.live,
                     "layout": args.decode_layout, "mesh": dict(dmesh.shape)}
    if args.decode_layout == "decode":
        # Per device, a step must read its weight shard (all weights when replicated) and its
        # rows' cache: the floor of the layout, not of the whole model spread over 8 devices.
        row["decode_bytes_ratio"] = dec["bytes"] / (dfloor["weight_bytes"] / tensor + dfloor["kv_bytes"] / devices)
    else:
        row["decode_bytes_ratio"] = dec["bytes"] * devices / dfloor["bytes"]
    row["decode_collective_fraction"] = dec["collective_bytes"] / dfloor["weight_bytes"]
    f32 = lambda x: sum(c["f32_bytes"] for c in x["collectives"].values()) / max(x["collective_bytes"], 1)
    row["train_collective_f32_share"], row["decode_collective_f32_share"] = f32(train["xla"]), f32(dec)

    feat = depth_cost(lambda cf: features_program(cf, mesh, batch=args.batch, length=args.length, **kw), arch)
    ffloor = features_floor(arch, batch=args.batch, length=args.length)
    row["features"] = {"xla": feat, "floor_flops": ffloor, "batch": args.batch, "length": args.length}
    row["features_flops_ratio"] = feat["flops"] * devices / ffloor

    for gpu, spec in GPUS.items():
        peak, hbm = spec["peak_flops"], spec["hbm_bytes_s"]
        x = train["xla"]
        step_s = max(x["flops"] / peak, x["bytes"] / hbm)
        row[f"train_mfu_upper_bound_{gpu}"] = train["floor"]["flops"] / devices / peak / step_s
        row[f"decode_tokens_per_s_upper_bound_{gpu}"] = args.batch / (dec["bytes"] / hbm)
        # What the floor's bytes would allow, spread evenly over the devices.
        row[f"decode_tokens_per_s_floor_{gpu}"] = args.batch / (dfloor["bytes"] / devices / hbm)
    row["compile_s"] = (sum(t["xla"]["compile_s"] for t in row["train"].values())
                        + dec["compile_s"] + feat["compile_s"])
    return row


def table(rows: list[dict]) -> str:
    alts = [r for r in rows[0]["train"] if r != rows[0]["train_remat"]] if rows else []
    head = ["model", "params", f"train FLOPs ratio ({rows[0]['train_remat'] if rows else ''})",
            "train coll. ratio", *(f"train FLOPs / coll. ratio ({alt})" for alt in alts),
            "decode bytes ratio", "decode coll. fraction", "features FLOPs ratio",
            "train MFU ub H100", "train MFU ub H200", "decode tok/s ub H100", "decode tok/s ub H200"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t = r["train"]
        cells = [r["model"], f"{r['params_b']:.2f}B", f"{r['train_flops_ratio']:.2f}",
                 f"{r['train_collective_ratio']:.2f}",
                 *(f"{t[alt]['flops_ratio']:.2f} / {t[alt]['collective_ratio']:.2f}" for alt in alts),
                 f"{r['decode_bytes_ratio']:.2f}",
                 f"{r['decode_collective_fraction']:.2f}", f"{r['features_flops_ratio']:.2f}",
                 f"{r['train_mfu_upper_bound_H100']:.1%}", f"{r['train_mfu_upper_bound_H200']:.1%}",
                 f"{r['decode_tokens_per_s_upper_bound_H100']:.0f}",
                 f"{r['decode_tokens_per_s_upper_bound_H200']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_while() -> None:
    """Evidence for the docstring: a scanned model's FLOPs do not grow with depth, an unrolled one's do."""
    from lasa_jax.model.config import ModelConfig
    cfg = ModelConfig(family="llama", vocab_size=1024, hidden_size=256, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=64, intermediate_size=512)
    mesh = shd.make_mesh(1, -1, 1)
    for layers in (1, 2, 4):
        flops, loops = {}, {}
        for kind, unroll in (("scanned", 1), ("unrolled", True)):
            c = dataclasses.replace(cfg, num_layers=layers)
            lm = abstract_model(c, mesh, dtype="float32", param_dtype="float32")
            lm.module = lm.module.clone(scan_unroll=unroll)
            sh = shd.batch_sharding(mesh)
            tok = jax.ShapeDtypeStruct((16, 128), jnp.int32, sharding=sh)
            msk = jax.ShapeDtypeStruct((16, 128), jnp.bool_, sharding=sh)
            cost = compiled_cost(lm._features_fn.lower(_sharded_params(lm), tok, msk, tuple(range(layers + 1))))
            flops[kind], loops[kind] = cost["flops"], cost["while_loops"]
        print(f"{layers} layer(s): " + ", ".join(f"{k} {flops[k]:.4g} FLOPs ({loops[k]} while loop(s))"
                                                 for k in flops))


def main() -> None:
    from lasa_jax.presets import KNOWN_MODELS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="", help="comma-separated subset of " + ",".join(KNOWN_MODELS))
    p.add_argument("--json", default="", help="also write every number here")
    p.add_argument("--batch", type=int, default=64, help="decode and features batch")
    p.add_argument("--slots", type=int, default=1024, help="decode cache slots (prompt + new tokens)")
    p.add_argument("--live", type=int, default=768, help="live cache slots mid-generation (the floor)")
    p.add_argument("--length", type=int, default=512, help="features tokens per row")
    p.add_argument("--also-remat", nargs="*", default=[], choices=["none", "dots", "dots_no_batch", "full"],
                   help="also compile the align step under these remat policies")
    p.add_argument("--decode-layout", choices=["decode", "train"], default="decode",
                   help="decode on LanguageModel.for_decoding's layout (as generate does) or on the "
                        "training mesh (the layout before the decode layout existed)")
    p.add_argument("--device-gb", type=float, default=80.0,
                   help="device memory the decode layout's width rule assumes (H100: 80)")
    p.add_argument("--dtype", default="", choices=["", "float32", "bfloat16"],
                   help="override the config's compute and weight dtype (default: the paper config's)")
    p.add_argument("--check-while", action="store_true", help="show that a while body is counted once")
    args = p.parse_args()
    if jax.device_count() != 8:
        sys.exit(f"roofline: expected 8 simulated devices, got {jax.device_count()} (XLA_FLAGS set elsewhere?)")
    if args.check_while:
        check_while()
        return
    names = [n for n in args.models.split(",") if n] or list(KNOWN_MODELS)
    t0, rows = time.perf_counter(), []
    for name in names:
        rows.append(measure(name, args))
        print(f"{name}: compiled in {rows[-1]['compile_s']:.0f} s", file=sys.stderr, flush=True)
    print(table(rows))
    # ru_maxrss is KiB on Linux: a few GiB at most shows no weight was ever allocated.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"wall {time.perf_counter() - t0:.0f} s, peak host RSS {rss:.2f} GiB", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "peak_rss_gib": rss, "gpus": GPUS, "argv": sys.argv[1:]}, f, indent=2)


if __name__ == "__main__":
    main()
