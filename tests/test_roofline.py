"""bench/roofline.py: the depth extrapolation of XLA's costs and the collective parser, on the 8
simulated CPU devices of conftest.py (shapes only, nothing allocated)."""
import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

_spec = importlib.util.spec_from_file_location(
    "bench_roofline", os.path.join(os.path.dirname(__file__), os.pardir, "bench", "roofline.py"))
roofline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(roofline)

from lasa_jax.config import base_config  # noqa: E402
from lasa_jax.infra.mesh import collectives, make_mesh  # noqa: E402
from lasa_jax.model.config import ModelConfig  # noqa: E402

TINY = ModelConfig(family="qwen3", vocab_size=512, hidden_size=128, num_layers=4, num_heads=4,
                   num_kv_heads=2, head_dim=32, intermediate_size=256, qk_norm=True)


def _check_extrapolation(build):
    """Costs extrapolated from unrolled 1- and 2-layer compiles equal those of the unrolled
    4-layer compile: FLOPs within 1 %; bytes accessed and collective bytes within 5 % (they
    follow XLA's fusion choices, which differ a little with depth: the tiny decode step's bytes
    came out 3.2 % under the 4-layer compile's)."""
    got = roofline.depth_cost(build, TINY)
    want = roofline.compiled_cost(build(TINY))
    assert want["while_loops"] == 0
    assert got["flops"] == pytest.approx(want["flops"], rel=0.01)
    assert got["bytes"] == pytest.approx(want["bytes"], rel=0.05)
    assert got["collective_bytes"] == pytest.approx(want["collective_bytes"], rel=0.05)
    return want


def test_depth_extrapolation_features():
    mesh = make_mesh(1, 8, 1)
    kw = dict(dtype="bfloat16", param_dtype="bfloat16")
    feats = _check_extrapolation(lambda cfg: roofline.features_program(cfg, mesh, batch=16, length=64, **kw))
    # Sanity of the floor: XLA's FLOPs (x 8 devices) sit above it (dense attention, norms).
    assert feats["flops"] * 8 > roofline.features_floor(TINY, batch=16, length=64)


def test_depth_extrapolation_decode():
    """The decode step as generate runs it (LanguageModel.for_decoding's copy: one weight tree
    and one cache array per layer) is linear in depth, so the extrapolation holds."""
    mesh = make_mesh(8, 1, 1)
    kw = dict(dtype="bfloat16", param_dtype="bfloat16", layout="decode")
    _check_extrapolation(lambda cfg: roofline.decode_program(cfg, mesh, batch=16, slots=64, **kw))


# The training layout's decode step (stacked weights and cache, the layout generate used before
# the decode copy) copies each layer's weights and cache out of the stacked arrays on XLA:CPU,
# and its cost grows faster than linearly with depth, so the extrapolation under-counts it; kept
# only as the "before" of bench/RESULTS.md. Strict: a change in XLA that fixes this shows.
@pytest.mark.xfail(strict=True, reason="stacked-layout decode step: superlinear cost in depth (issue 16)")
def test_depth_extrapolation_decode_training_layout():
    mesh = make_mesh(1, 8, 1)
    kw = dict(dtype="bfloat16", param_dtype="bfloat16", layout="train")
    _check_extrapolation(lambda cfg: roofline.decode_program(cfg, mesh, batch=16, slots=64, **kw))


# The align step (a bigger program: ~1 minute per compile on 2 loaded cores): opt-in.
@pytest.mark.slow
def test_depth_extrapolation_align_step():
    mesh = make_mesh(1, 8, 1)
    a = base_config().align
    a.batch_size, a.max_length = 8, 64
    want = _check_extrapolation(lambda cfg: roofline.train_program(
        cfg, mesh, dtype="bfloat16", param_dtype="bfloat16", remat="full", acfg=a))
    assert want["flops"] * 8 > roofline.train_floors(TINY, batch=8, length=64, remat="full",
                                                     compute_bytes=2)["flops"]


def test_scanned_loop_body_counted_once():
    mesh = make_mesh(1, 8, 1)
    one, four = (roofline.features_program(dataclasses.replace(TINY, num_layers=n), mesh, dtype="float32",
                                           param_dtype="float32", batch=8, length=64) for n in (1, 4))
    scanned = roofline._unrolled_model(TINY, mesh, "float32", "float32")
    scanned.module = scanned.module.clone(scan_unroll=1)
    sh = NamedSharding(mesh, P(("data", "fsdp"), None))
    tok = jax.ShapeDtypeStruct((8, 64), jnp.int32, sharding=sh)
    msk = jax.ShapeDtypeStruct((8, 64), jnp.bool_, sharding=sh)
    loop = roofline.compiled_cost(scanned._features_fn.lower(roofline._sharded_params(scanned), tok, msk,
                                                             tuple(range(5))))
    c1, c4 = roofline.compiled_cost(one), roofline.compiled_cost(four)
    assert loop["while_loops"] == 1 and c4["while_loops"] == 0
    assert loop["flops"] < 0.5 * c4["flops"]
    assert c4["flops"] > 3 * c1["flops"]


def test_collective_parser_counts_a_known_all_gather_and_reduce_scatter():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    x = jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=NamedSharding(mesh, P("x", None)))
    # Sharded rows -> replicated: one all-gather assembling the whole (64, 32) float32 array.
    gather = jax.jit(lambda a: a * 2, out_shardings=NamedSharding(mesh, P()))
    got = collectives(gather.lower(x).compile().as_text())
    assert got["all-gather"] == {"count": 1, "bytes": 64 * 32 * 4, "f32_bytes": 64 * 32 * 4}
    assert sum(v["count"] for k, v in got.items() if k != "all-gather") == 0
    # A contraction over the sharded dimension, result sharded: a reduce-scatter (or an
    # all-reduce) of the whole (32, 32) product.
    mm = jax.jit(lambda a: a.T @ a, out_shardings=NamedSharding(mesh, P("x", None)))
    got = collectives(mm.lower(x).compile().as_text())
    reduced = got["reduce-scatter"]["bytes"] + got["all-reduce"]["bytes"]
    assert reduced == 32 * 32 * 4, got


def test_parser_reads_tuples_async_starts_and_iota_groups():
    text = "\n".join([
        "  %ag = (bf16[8,128]{1,0}, f32[16]{0}) all-gather(%a, %b), replica_groups={{0,1,2,3}}, dimensions={0}",
        "  %rs = f32[4,8]{1,0} reduce-scatter(%c), replica_groups=[2,4]<=[8], dimensions={0}",
        "  %s = (f32[2]{0}, f32[16]{0}) all-gather-start(%d), replica_groups={{0,1,2,3,4,5,6,7}}",
        "  %e = f32[16]{0} all-gather-done(%s)",
        "  %cp = s32[10]{0} collective-permute(%f), source_target_pairs={{0,1}}",
    ])
    got = collectives(text)
    assert got["all-gather"] == {"count": 2, "bytes": 8 * 128 * 2 + 16 * 4 + 16 * 4, "f32_bytes": 16 * 4}
    assert got["reduce-scatter"] == {"count": 1, "bytes": 4 * 8 * 4 * 4, "f32_bytes": 4 * 8 * 4 * 4}
    assert got["collective-permute"] == {"count": 1, "bytes": 40, "f32_bytes": 0}


def test_floors_by_hand():
    # N: 4 layers x (2*128*128 + 2*128*64 + 3*128*256) + 128*512 (head) = 4 x 163840 + 65536.
    assert roofline.matmul_params(TINY) == 4 * 147456 + 65536
    assert roofline.causal_attention_flops(TINY, 2, 8) == 2 * 2 * 64 * 4 * 32 * 4
    f = roofline.train_floors(TINY, batch=2, length=8, remat="none", compute_bytes=2)
    assert f["collective_bytes"] == TINY.num_params() * 2 * 3
    d = roofline.decode_floors(TINY, batch=2, live=5, param_bytes=2, cache_bytes=2)
    assert d["kv_bytes"] == 2 * 4 * 2 * 5 * 2 * 32 * 2
    assert np.isclose(d["weight_bytes"], (TINY.num_params() - 512 * 128 + 2 * 128) * 2)
