"""Per-device memory of the align step for the 7 paper models, measured by XLA, beside the fit check.

    PYTHONPATH=. python bench/align_memory.py [--devices 8] [--mesh DATA,FSDP,TENSOR] [--dtype float32]
                                              [--models qwen3-8b,...] [--json OUT]
    PYTHONPATH=. python bench/align_memory.py --small    # the test's small model, several policies

For each paper model (``lasa_jax.presets.KNOWN_MODELS``) with its run config's defaults
(``configs/<model>.py``: bf16 weights and compute, float32 masters and AdamW moments, remat
"full", batch 16 x 512 tokens, precomputed reference, mesh fsdp = all devices), the real train
step (``Trainer.lower``) is compiled for shapes only on ``--devices`` simulated CPU devices: no
weight is allocated. XLA's ``memory_analysis()`` gives the per-device bytes: arguments (masters,
moments, batch) + outputs - outputs aliased to donated arguments + temporaries. Beside it: the
fit check's estimate (``lasa_jax.infra.fitcheck``) and whether it fits an 80 GB GPU (H100/A100
80GB) and a TPU v5p chip (95 GiB HBM) at the check's 90 % headroom.

Caveat: this is XLA's CPU compiler. Its buffer assignment packs the same program a GPU or TPU
runs, but it upcasts bf16 matmul operands to float32 (no native bf16 GEMM), which adds float32
copies of activations and gathered weights that an accelerator does not hold; the activation
part of the CPU number is therefore an overestimate for bf16 compute. ``--dtype float32`` (weights
and compute in float32, masters and moments float32 as always) compiles a program the CPU runs
as written, to check the estimate where XLA's number is faithful. ``--small`` does that for the
small qwen2-style model of tests/test_fitcheck.py under several remat / accumulation / reference
policies and meshes (float32, 8 devices).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

GB, GiB = 10 ** 9, 2 ** 30
DEVICES = {"80 GB GPU": 80 * GB, "TPU v5p (95 GiB)": 95 * GiB}
HEADROOM = 0.9


def measure(name: str, num_devices: int, dtype: str = "", mesh_override: str = "") -> dict:
    from lasa_jax.infra import fitcheck
    from lasa_jax.infra.mesh import mesh_from_config, resolve_mesh_shape
    from lasa_jax.method.trainer import Trainer, abstract_model, batch_shapes
    from lasa_jax.presets import KNOWN_MODELS, paper_model_config

    c = paper_model_config(name)
    c.unlock()
    if dtype:
        c.model.dtype = c.model.param_dtype = dtype
    if mesh_override:  # e.g. 32 devices: fsdp=32 does not divide the batch of 16
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = (int(x) for x in mesh_override.split(","))
    m, a = c.model, c.align
    arch = KNOWN_MODELS[name]
    mesh = mesh_from_config(c.mesh)
    lm = abstract_model(arch, mesh, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
    precomputed = a.reference == "precomputed"
    trainer = Trainer(lm, a, total_steps=1000, per_step_reference=not precomputed)
    t0 = time.perf_counter()
    stats = trainer.lower(batch_shapes(a.batch_size, a.grad_accum, a.max_length,
                                       precomputed=precomputed)).compile().memory_analysis()
    seconds = time.perf_counter() - t0
    xla = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
           + stats.temp_size_in_bytes)
    shape = dict(zip(("data", "fsdp", "tensor"),
                     resolve_mesh_shape(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, num_devices)))
    est = fitcheck.estimate(arch, stage="align", mesh_shape=shape, param_dtype=m.param_dtype,
                            compute_dtype=m.dtype, batch_size=a.batch_size, seq_len=a.max_length,
                            remat=m.remat, reference=a.reference, master_dtype=a.master_dtype,
                            grad_accum=a.grad_accum)
    return {"model": name, "params_b": arch.num_params() / 1e9, "mesh": shape, "remat": m.remat,
            "dtype": m.dtype, "master_dtype": a.master_dtype,
            "batch": a.batch_size, "seq_len": a.max_length, "compile_s": seconds,
            "xla": {"argument": stats.argument_size_in_bytes, "output": stats.output_size_in_bytes,
                    "alias": stats.alias_size_in_bytes, "temp": stats.temp_size_in_bytes, "total": xla},
            "fitcheck": {"total": est.total, "breakdown": est.breakdown}}


SMALL_POLICIES = [  # (mesh, remat, grad_accum, reference)
    ((1, 8, 1), "full", 1, "precomputed"), ((1, 8, 1), "none", 1, "precomputed"),
    ((1, 8, 1), "dots", 1, "precomputed"), ((1, 8, 1), "none", 2, "precomputed"),
    ((1, 8, 1), "full", 1, "per_step"), ((2, 4, 1), "full", 1, "precomputed"),
    ((1, 4, 2), "full", 1, "precomputed"),
]


def small_grid() -> str:
    """The small model of tests/test_fitcheck.py, float32, under each of SMALL_POLICIES."""
    from lasa_jax.config import base_config
    from lasa_jax.infra import fitcheck
    from lasa_jax.infra.mesh import make_mesh
    from lasa_jax.method.trainer import Trainer, abstract_model, batch_shapes
    from lasa_jax.model.config import ModelConfig

    m = ModelConfig(family="qwen2", vocab_size=8192, hidden_size=512, num_layers=4, num_heads=8,
                    num_kv_heads=2, head_dim=64, intermediate_size=1536, qkv_bias=True)
    MiB = 2 ** 20
    lines = ["| mesh | remat | micro-batches | reference | XLA total | fit check | fit / XLA |",
             "|---|---|---|---|---|---|---|"]
    for mesh, remat, accum, reference in SMALL_POLICIES:
        lm = abstract_model(m, make_mesh(*mesh), dtype="float32", param_dtype="float32", remat=remat)
        a = base_config().align
        a.batch_size, a.grad_accum, a.reference = 16 * accum, accum, reference
        trainer = Trainer(lm, a, total_steps=10, per_step_reference=reference == "per_step")
        stats = trainer.lower(batch_shapes(a.batch_size, accum, 128, precomputed=reference == "precomputed")
                              ).compile().memory_analysis()
        xla = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
               + stats.temp_size_in_bytes)
        est = fitcheck.estimate(m, stage="align", mesh_shape=dict(zip(fitcheck.MESH_AXES, mesh)),
                                param_dtype="float32", compute_dtype="float32", batch_size=a.batch_size,
                                seq_len=128, remat=remat, reference=reference, grad_accum=accum)
        lines.append(f"| {mesh} | {remat} | {accum} | {reference} | {xla / MiB:.1f} MiB | "
                     f"{est.total / MiB:.1f} MiB | {est.total / xla:.2f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = ("| model | params | mesh (data, fsdp, tensor) | XLA args | XLA temp | XLA total | fit check "
            "| fit / XLA | " + " | ".join(f"fits {k}" for k in DEVICES) + " |")
    lines = [head, "|" + "---|" * (8 + len(DEVICES))]
    for r in rows:
        x, e = r["xla"], r["fitcheck"]["total"]
        mesh = ", ".join(str(r["mesh"][k]) for k in ("data", "fsdp", "tensor"))
        fits = " | ".join("yes" if max(x["total"], e) <= HEADROOM * cap else
                          ("no" if min(x["total"], e) > HEADROOM * cap else "borderline")
                          for cap in DEVICES.values())
        lines.append(f"| {r['model']} | {r['params_b']:.2f}B | {mesh} | {x['argument'] / GiB:.1f} GiB "
                     f"| {x['temp'] / GiB:.1f} GiB | {x['total'] / GiB:.1f} GiB | {e / GiB:.1f} GiB "
                     f"| {e / x['total']:.2f} | {fits} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices (the mesh fills them)")
    p.add_argument("--mesh", default="", help="DATA,FSDP,TENSOR instead of the configs' (1, all, 1)")
    p.add_argument("--dtype", default="", help="override the configs' weight and compute dtype (bfloat16)")
    p.add_argument("--models", default="", help="comma-separated subset of the paper models")
    p.add_argument("--json", default="", help="also write the measurements here")
    p.add_argument("--small", action="store_true", help="the small test model under several policies")
    args = p.parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.small:
        print(small_grid())
        return
    from lasa_jax.presets import KNOWN_MODELS
    names = [n for n in args.models.split(",") if n] or list(KNOWN_MODELS)
    rows = []
    for name in names:
        rows.append(measure(name, args.devices, args.dtype, args.mesh))
        r = rows[-1]
        print(f"{name}: XLA {r['xla']['total'] / GiB:.2f} GiB per device, fit check "
              f"{r['fitcheck']['total'] / GiB:.2f} GiB (compiled in {r['compile_s']:.0f} s)",
              file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
