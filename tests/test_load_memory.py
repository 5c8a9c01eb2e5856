"""Host memory of checkpoint loading: peak RSS of a fresh process that loads a 190 MiB bf16
LLaMA-shaped checkpoint stays within 1.25 x the checkpoint's bytes (plus a small fixed allowance),
on one device and on an 8-device fsdp mesh; and the loaded values are the written ones, exactly.

The checkpoint is written by bench/load_memory.py (hand-rolled safetensors, streamed), whose
output is first checked against the safetensors library's own reader.
"""
import importlib.util
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

_spec = importlib.util.spec_from_file_location(
    "bench_load_memory", os.path.join(os.path.dirname(__file__), os.pardir, "bench", "load_memory.py"))
lm_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lm_bench)

MIB = 1 << 20
TARGET = 1.25
# Fixed cost of a load, independent of the checkpoint's size: a 0.2 MB checkpoint raises the peak
# by ~5 MiB (Flax shape trace of the model, XLA's first host-to-device transfers, safetensors
# headers). On top, glibc keeps freed blocks under its dynamic mmap threshold (<= 32 MiB) in its
# arenas: here one 8 MiB per-layer slice can stay resident; at real sizes every slice is above
# the threshold and goes back to the OS. 5 + 8 MiB, rounded up:
ALLOWANCE = 16 * MIB

DUMPED = ("embed_tokens", "layers/mlp/down_proj_kernel", "layers/self_attn/q_proj_kernel",
          "layers/self_attn/o_proj_kernel")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("ckpt"))
    cfg = lm_bench.hf_config("small")
    nbytes = lm_bench.write_checkpoint(directory, cfg, num_shards=2)
    return directory, cfg, nbytes


@pytest.fixture(scope="module")
def loads(checkpoint, tmp_path_factory):
    """One fresh loader process per device count; both results shared by the tests below."""
    directory, _, nbytes = checkpoint
    out = {}
    for fsdp in (1, 8):
        dump = str(tmp_path_factory.mktemp(f"dump{fsdp}"))
        r = lm_bench.measure_load(directory, fsdp, dump_dir=dump, dump=DUMPED, timeout=120)
        print(f"\n[fsdp={fsdp}] checkpoint {nbytes / MIB:.1f} MiB; baseline {r['baseline_rss'] / MIB:.1f} MiB; "
              f"peak {r['peak'] / MIB:.1f} MiB; peak-baseline {(r['peak'] - r['baseline_rss']) / MIB:.1f} MiB "
              f"= {(r['peak'] - r['baseline_rss']) / nbytes:.3f} x; raw peak {r['peak'] / nbytes:.3f} x; "
              f"load {r['seconds']:.1f}s")
        out[fsdp] = (r, dump)
    return out


def test_written_checkpoint_reads_back_with_safetensors(checkpoint):
    directory, cfg, nbytes = checkpoint
    shapes = lm_bench.hf_tensor_shapes(cfg)
    assert nbytes == sum(2 * int(np.prod(s)) for s in shapes.values())
    import json
    weight_map = json.load(open(os.path.join(directory, "model.safetensors.index.json")))["weight_map"]
    assert set(weight_map) == set(shapes) and len(set(weight_map.values())) == 2
    for name in ("model.embed_tokens.weight", "model.layers.5.mlp.up_proj.weight"):
        with safe_open(os.path.join(directory, weight_map[name]), framework="numpy") as h:
            got = h.get_tensor(name)
        want = lm_bench.tensor_values(name, shapes[name])
        assert got.dtype == ml_dtypes.bfloat16 and got.shape == shapes[name]
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))  # exact bits
        assert np.isfinite(got.astype(np.float32)).all()


@pytest.mark.parametrize("fsdp", [1, 8])
def test_loaded_params_equal_written_tensors(checkpoint, loads, fsdp):
    """Exact (bit-for-bit bf16) equality, with torch's (out, in) layouts turned into ours
    ((in, out), heads split) by plain NumPy here, independently of the loader's own code."""
    _, cfg, _ = checkpoint
    shapes = lm_bench.hf_tensor_shapes(cfg)
    d, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    h = cfg["num_attention_heads"]
    hd = d // h
    _, dump = loads[fsdp]
    got = {p: np.load(os.path.join(dump, p.replace("/", "__") + ".npy")) for p in DUMPED}

    def hf(name):
        return lm_bench.tensor_values(name, shapes[name]).view(np.uint16)

    np.testing.assert_array_equal(got["embed_tokens"], hf("model.embed_tokens.weight"))
    for i in (0, L - 1):
        np.testing.assert_array_equal(got["layers/mlp/down_proj_kernel"][i],
                                      hf(f"model.layers.{i}.mlp.down_proj.weight").T)
    np.testing.assert_array_equal(got["layers/self_attn/q_proj_kernel"][1],
                                  hf("model.layers.1.self_attn.q_proj.weight").T.reshape(d, h, hd))
    np.testing.assert_array_equal(got["layers/self_attn/o_proj_kernel"][2],
                                  hf("model.layers.2.self_attn.o_proj.weight").T.reshape(h, hd, d))


@pytest.mark.parametrize("fsdp", [1, 8])
def test_peak_host_memory_within_bound(checkpoint, loads, fsdp):
    """(peak - baseline) RSS <= 1.25 x checkpoint bytes + ALLOWANCE (16 MiB, see above)."""
    _, _, nbytes = checkpoint
    r, _ = loads[fsdp]
    assert r["devices"] == fsdp and r["dtypes"] == ["bfloat16"] and r["param_bytes"] == nbytes
    used = r["peak"] - r["baseline_rss"]
    assert used <= TARGET * nbytes + ALLOWANCE, (
        f"fsdp={fsdp}: peak - baseline = {used / MIB:.1f} MiB = {used / nbytes:.3f} x the "
        f"{nbytes / MIB:.1f} MiB checkpoint (bound {TARGET} x + {ALLOWANCE // MIB} MiB)")
