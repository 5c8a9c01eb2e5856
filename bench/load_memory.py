"""Peak host memory of ``load_model`` on a LLaMA-shaped bf16 checkpoint, against its size.

    PYTHONPATH=. python bench/load_memory.py [--fsdp 8] [--size 1b|small] [--dir DIR] [--keep]

Writes a random bf16 checkpoint in Hugging Face naming (safetensors, several shards), streamed
tensor by tensor so the writer never holds the model; then, in a fresh Python process, imports
JAX and lasa_jax, records the baseline RSS, runs ``load_model(path, dtype="bfloat16",
tokenizer=False)`` (with ``--fsdp N``: on ``N`` simulated CPU devices, ``make_mesh(1, N, 1)``)
and records the peak RSS (``ru_maxrss``). Loaded parameters live in host memory on CPU, so the
ideal is peak - baseline = 1.0 x checkpoint bytes; the target is <= 1.25 x.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Llama-3.2-1B's shape (1.24B parameters, 2.30 GiB in bf16) and a 190 MiB one for the test with
# the same proportions: tied embeddings, MLP ~75% of the bytes, so each stacked MLP kernel is a
# quarter of the model (as in 8B models), which is what makes a per-tensor extra copy visible.
SIZES = {
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "small": dict(vocab_size=8192, hidden_size=1024, intermediate_size=4096, num_hidden_layers=6,
                  num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True),
}

_CHUNK = 1 << 24  # elements generated at once: 32 MB of bf16


def hf_config(size: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
            "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, **SIZES[size]}


def hf_tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> torch-layout shape, from the LLaMA architecture (written out here, not
    taken from lasa_jax, so the loader is checked against an independent description)."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f)})
    shapes["model.norm.weight"] = (d,)
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (v, d)
    return shapes


def tensor_chunks(name: str, shape: tuple[int, ...], seed: int = 0):
    """Deterministic random bf16 bit patterns (as uint16) for one tensor, in flat chunks.

    Random bits with the exponent pinned to 2^-9 .. 2^-2 give finite weight-like values of both
    signs (no NaN, so loaded tensors can be compared exactly), and cost far less to draw than
    normal samples: the 1B checkpoint is written in seconds, not minutes."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    n = math.prod(shape)
    for start in range(0, n, _CHUNK):
        bits = rng.integers(0, 1 << 16, size=min(_CHUNK, n - start), dtype=np.uint16)
        yield (bits & np.uint16(0x807F)) | ((((bits >> 7) & np.uint16(7)) + np.uint16(118)) << 7)


def tensor_values(name: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """The full tensor ``write_checkpoint`` wrote for ``name``, as bfloat16."""
    import ml_dtypes
    return np.concatenate(list(tensor_chunks(name, shape, seed))).view(ml_dtypes.bfloat16).reshape(shape)


def _write_shard(file: str, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
    """A safetensors file written by hand (8-byte header length, JSON header, raw data), so each
    tensor can be streamed to disk chunk by chunk instead of being held whole."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header so the data starts 8-aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in shapes.items():
            for chunk in tensor_chunks(name, shape, seed):
                f.write(chunk.astype("<u2", copy=False).tobytes())


def write_checkpoint(directory: str, cfg: dict, num_shards: int = 2, seed: int = 0) -> int:
    """Write config.json, ``num_shards`` safetensors shards and the index; return tensor bytes."""
    os.makedirs(directory, exist_ok=True)
    shapes = hf_tensor_shapes(cfg)
    total = sum(2 * math.prod(s) for s in shapes.values())
    shards: list[dict] = [{} for _ in range(num_shards)]
    done = 0
    for name, shape in shapes.items():  # contiguous split into roughly equal byte ranges
        shards[min(num_shards - 1, done * num_shards // total)][name] = shape
        done += 2 * math.prod(shape)
    shards = [s for s in shards if s]
    weight_map = {}
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(os.path.join(directory, fname), part, seed)
        weight_map.update({n: fname for n in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return total


# ----------------------------------------------------------------------------- measurement
def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmRSS line")


def _peak_bytes() -> int:
    """High-water RSS of this process image. VmHWM is reset by exec; ru_maxrss is not (a child
    started from a large parent, e.g. pytest, would report the parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _child(path: str, fsdp: int, dump_dir: str | None, dump: list[str]) -> None:
    """Runs in the fresh process: baseline, load, peak; optionally dump some loaded params."""
    import jax
    import flax.linen  # noqa: F401  (imported before the baseline: not the loader's memory)
    from lasa_jax.infra import mesh as sharding
    from lasa_jax.model.lm import load_model
    from lasa_jax.model import transformer  # noqa: F401

    mesh = sharding.make_mesh(1, fsdp, 1) if fsdp > 1 else None
    jax.block_until_ready(jax.device_put(np.zeros(1, np.float32), jax.devices()[0]))
    base_rss, base_peak = _rss_bytes(), _peak_bytes()
    t = time.perf_counter()
    lm = load_model(path, dtype="bfloat16", mesh=mesh, tokenizer=False)
    jax.block_until_ready(lm.params)
    seconds = time.perf_counter() - t
    peak, after = _peak_bytes(), _rss_bytes()
    leaves = jax.tree_util.tree_leaves(lm.params)
    result = dict(devices=len(jax.devices()), fsdp=fsdp, baseline_rss=base_rss,
                  baseline_peak=base_peak, peak=peak, rss_after=after, seconds=seconds,
                  param_bytes=sum(x.nbytes for x in leaves),
                  dtypes=sorted({str(x.dtype) for x in leaves}),
                  shardings=sorted({str(x.sharding.spec) for x in leaves
                                    if hasattr(x.sharding, "spec")})[:4])
    if dump_dir:
        from lasa_jax.model.checkpoint import flatten
        flat = flatten(lm.params)
        for p in dump:
            np.save(os.path.join(dump_dir, p.replace("/", "__") + ".npy"),
                    np.asarray(jax.device_get(flat[p])).view(np.uint16))
    print("RESULT " + json.dumps(result), flush=True)


def measure_load(path: str, fsdp: int = 1, *, dump_dir: str | None = None, dump: tuple[str, ...] = (),
                 timeout: float = 900) -> dict:
    """Load ``path`` in a fresh interpreter and return its memory numbers (bytes)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    if fsdp > 1:
        flags.append(f"--xla_force_host_platform_device_count={fsdp}")
    env["XLA_FLAGS"] = " ".join(flags)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", path, "--fsdp", str(fsdp)]
    if dump_dir:
        cmd += ["--dump-dir", dump_dir, "--dump", ",".join(dump)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"loader subprocess failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def report(r: dict, ckpt_bytes: int) -> str:
    gib = 1 << 30
    return "\n".join([
        f"devices: {r['devices']} (fsdp={r['fsdp']}), param shardings e.g. {r['shardings']}",
        f"checkpoint tensors: {ckpt_bytes / gib:.3f} GiB; loaded params {r['param_bytes'] / gib:.3f} GiB "
        f"{r['dtypes']} in {r['seconds']:.1f}s",
        f"baseline RSS after imports: {r['baseline_rss'] / gib:.3f} GiB (ru_maxrss so far "
        f"{r['baseline_peak'] / gib:.3f} GiB)",
        f"peak RSS (ru_maxrss): {r['peak'] / gib:.3f} GiB; RSS after load {r['rss_after'] / gib:.3f} GiB",
        f"(peak - baseline) / checkpoint bytes = {(r['peak'] - r['baseline_rss']) / ckpt_bytes:.3f}  "
        f"(target <= 1.25)",
        f"raw peak / checkpoint bytes          = {r['peak'] / ckpt_bytes:.3f}",
    ])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--fsdp", type=int, default=1, help="simulated CPU devices on the fsdp axis")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--dir", default=None, help="checkpoint directory (default: a temporary one); "
                    "an existing checkpoint there is reused")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dump-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dump", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args.child, args.fsdp, args.dump_dir, [p for p in args.dump.split(",") if p])

    directory = args.dir or tempfile.mkdtemp(prefix=f"lasa-loadmem-{args.size}-")
    cfg = hf_config(args.size)
    try:
        if os.path.exists(os.path.join(directory, "model.safetensors.index.json")):
            total = json.load(open(os.path.join(directory, "model.safetensors.index.json")))["metadata"]["total_size"]
            print(f"reusing {directory}")
        else:
            t = time.perf_counter()
            total = write_checkpoint(directory, cfg, args.shards)
            print(f"wrote {directory}: {sum(math.prod(s) for s in hf_tensor_shapes(cfg).values()) / 1e9:.2f}B "
                  f"params, {total / 2**30:.3f} GiB bf16, {args.shards} shards, {time.perf_counter() - t:.1f}s")
        print(report(measure_load(directory, args.fsdp), total))
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
