"""Hugging Face safetensors checkpoints <-> the stacked parameter tree.

Loading never holds a second copy of the model on the host: every device shard is built by a
callback that reads exactly the rows/columns it needs from the safetensors files (one layer's
tensor slice at a time) and converts them to the target dtype. On several hosts each process
therefore reads only what its own devices hold. Export goes tensor by tensor, layer by layer,
into size-bounded shard files of a staged folder that becomes the target at the end
(``fileio.staged_dir``). A checkpoint may be a local (or mounted) folder or a ``gs://`` URL;
a URL's safetensors files are read by byte range (``remote_safetensors``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lasa_jax.errors import CheckpointError
from lasa_jax.infra.fileio import as_path, is_url, local_copy, read_text, staged_dir
from lasa_jax.infra.multihost import to_host
from lasa_jax.model.config import ModelConfig
from lasa_jax.model.remote_safetensors import RemoteSafetensors
from lasa_jax.model.transformer import param_specs


# Our parameter path -> (HF name, layout transform). "{i}" marks stacked per-layer tensors.
#   same:       identical layout
#   transpose:  torch (out, in) -> ours (in, out)
#   heads_out:  torch (heads*hd, d) -> ours (d, heads, hd)          q/k/v projections
#   heads_in:   torch (d, heads*hd) -> ours (heads, hd, d)          o projection
#   heads_bias: torch (heads*hd,) -> ours (heads, hd)               Qwen2 q/k/v bias
_LAYER = "model.layers.{i}."
PARAM_MAP: dict[str, tuple[str, str]] = {
    "embed_tokens": ("model.embed_tokens.weight", "same"),
    "norm/scale": ("model.norm.weight", "same"),
    "lm_head": ("lm_head.weight", "transpose"),
    "layers/input_layernorm/scale": (_LAYER + "input_layernorm.weight", "same"),
    "layers/post_attention_layernorm/scale": (_LAYER + "post_attention_layernorm.weight", "same"),
    "layers/self_attn/q_proj_kernel": (_LAYER + "self_attn.q_proj.weight", "heads_out"),
    "layers/self_attn/k_proj_kernel": (_LAYER + "self_attn.k_proj.weight", "heads_out"),
    "layers/self_attn/v_proj_kernel": (_LAYER + "self_attn.v_proj.weight", "heads_out"),
    "layers/self_attn/o_proj_kernel": (_LAYER + "self_attn.o_proj.weight", "heads_in"),
    "layers/self_attn/q_proj_bias": (_LAYER + "self_attn.q_proj.bias", "heads_bias"),
    "layers/self_attn/k_proj_bias": (_LAYER + "self_attn.k_proj.bias", "heads_bias"),
    "layers/self_attn/v_proj_bias": (_LAYER + "self_attn.v_proj.bias", "heads_bias"),
    "layers/self_attn/q_norm/scale": (_LAYER + "self_attn.q_norm.weight", "same"),
    "layers/self_attn/k_norm/scale": (_LAYER + "self_attn.k_norm.weight", "same"),
    "layers/mlp/gate_proj_kernel": (_LAYER + "mlp.gate_proj.weight", "transpose"),
    "layers/mlp/up_proj_kernel": (_LAYER + "mlp.up_proj.weight", "transpose"),
    "layers/mlp/down_proj_kernel": (_LAYER + "mlp.down_proj.weight", "transpose"),
}
# Tensors some checkpoints carry that have no parameter (precomputed rope tables).
_HARMLESS_EXTRA = ("rotary_emb.inv_freq",)

_HF_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, path))
        else:
            out[path] = v
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def hf_layout_shape(transform: str, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    if transform == "same":
        return tuple(our_shape)
    if transform == "transpose":
        return (our_shape[1], our_shape[0])
    if transform == "heads_out":
        d, h, hd = our_shape
        return (h * hd, d)
    if transform == "heads_in":
        h, hd, d = our_shape
        return (d, h * hd)
    if transform == "heads_bias":
        h, hd = our_shape
        return (h * hd,)
    raise AssertionError(transform)


def _read_slice(handle, name: str, transform: str, idx: tuple[slice, ...], our_shape) -> np.ndarray:
    """Read the part of HF tensor `name` that becomes our slice `idx` (no layer axis)."""
    rng = [s.indices(n) for s, n in zip(idx, our_shape)]
    sl = [slice(a, b) for a, b, _ in rng]
    t = handle.get_slice(name)
    if transform == "same":
        return t[tuple(sl)]
    if transform == "transpose":
        return t[sl[1], sl[0]].T
    if transform == "heads_out":
        (d0, d1, _), (h0, h1, _), _ = rng
        hd = our_shape[2]
        a = t[h0 * hd:h1 * hd, d0:d1].reshape(h1 - h0, hd, d1 - d0)[:, sl[2], :]
        return a.transpose(2, 0, 1)
    if transform == "heads_in":
        (h0, h1, _), _, (d0, d1, _) = rng
        hd = our_shape[1]
        a = t[d0:d1, h0 * hd:h1 * hd].reshape(d1 - d0, h1 - h0, hd)[:, :, sl[1]]
        return a.transpose(1, 2, 0)
    if transform == "heads_bias":
        (h0, h1, _), _ = rng
        hd = our_shape[1]
        return t[h0 * hd:h1 * hd].reshape(h1 - h0, hd)[:, sl[1]]
    raise AssertionError(transform)


class SafetensorsIndex:
    """Which file holds which tensor, and each tensor's shape and dtype (from the headers), for
    a local folder or a URL (``open`` gives the matching reader)."""

    def __init__(self, path: str):
        self.path = path = os.fspath(path)
        root = as_path(path)
        index_file = os.path.join(path, "model.safetensors.index.json")
        if (root / "model.safetensors.index.json").exists():
            try:
                weight_map = json.loads(read_text(index_file))["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index_file}: malformed index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif (root / "model.safetensors").exists():
            files, weight_map = ["model.safetensors"], None
        else:
            bins = sorted(p.name for p in root.iterdir() if p.name.endswith((".bin", ".pt", ".pth"))) \
                if root.is_dir() else []
            hint = f" (found {bins}: pickle checkpoints are not loaded for safety; convert to safetensors)" if bins else ""
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
        missing = [f for f in files if not (root / f).exists()]
        if missing:
            raise CheckpointError(f"{path}: shard file(s) listed in the index are missing: {missing}")
        self.file_of: dict[str, str] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, str] = {}
        self._headers: dict[str, tuple[int, dict]] = {}
        for fname in files:
            full = os.path.join(path, fname)
            try:
                with self.open(full) as h:
                    for name in h.keys():
                        sl = h.get_slice(name)
                        self.file_of[name] = full
                        self.shape[name] = tuple(sl.get_shape())
                        self.dtype[name] = sl.get_dtype()
                    if isinstance(h, RemoteSafetensors):
                        self._headers[full] = (h.start, h.entries)
            except CheckpointError:
                raise
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{full}: not a readable safetensors file ({e})") from None
        if weight_map is not None:
            absent = sorted(n for n, f in weight_map.items() if n not in self.file_of)
            if absent:
                raise CheckpointError(f"{index_file}: tensors listed but not found in their files: {absent[:10]}")

    def open(self, file: str):
        """A reader of one of the checkpoint's files: ``safe_open`` (memory-mapped) for a local
        file, byte-range reads for a URL (its header parsed once per index)."""
        if is_url(file):
            return RemoteSafetensors(file, self._headers.get(file))
        return safe_open(file, framework="numpy")


def stored_dtype(path: str) -> str:
    """The dtype a checkpoint stores its weights in ("bfloat16", "float32" or "float16"): that of
    most of its parameters (a few float32 norm scales in a bf16 checkpoint do not count)."""
    index = SafetensorsIndex(path)
    sizes: dict[str, int] = {}
    for name, code in index.dtype.items():
        if code in _HF_DTYPES and code != "F64":
            sizes[code] = sizes.get(code, 0) + int(np.prod(index.shape[name]))
    if not sizes:
        raise CheckpointError(f"{path}: no floating-point weights")
    return np.dtype(_HF_DTYPES[max(sizes, key=sizes.get)]).name


def expected_tensors(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, str, int | None, tuple]]:
    """HF name -> (our path, transform, layer or None, HF shape) for a param tree's shapes."""
    out = {}
    for path, shape in shapes.items():
        name, transform = PARAM_MAP[path]
        if path.startswith("layers/"):
            for i in range(shape[0]):
                out[name.format(i=i)] = (path, transform, i, hf_layout_shape(transform, shape[1:]))
        else:
            out[name] = (path, transform, None, hf_layout_shape(transform, shape))
    return out


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Flat path -> shape of the parameter tree, without allocating it."""
    return {path: shape for path, (shape, _) in param_specs(cfg).items()}


def check_checkpoint(path: str, cfg: ModelConfig) -> SafetensorsIndex:
    """The index of ``path``'s safetensors files (headers only, no tensor data), checked against
    ``cfg``: missing, unexpected and mis-shaped tensors are reported together in one error."""
    index = SafetensorsIndex(path)
    expected = expected_tensors(cfg, param_shapes(cfg))
    problems = []
    missing = sorted(n for n in expected if n not in index.file_of)
    if missing:
        problems.append(f"missing tensors: {missing}")
    unexpected = sorted(n for n in index.file_of if n not in expected and not n.endswith(_HARMLESS_EXTRA))
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected}")
    for name, (_, _, _, hf_shape) in expected.items():
        if name in index.shape and index.shape[name] != hf_shape:
            problems.append(f"{name}: shape {list(index.shape[name])} != expected {list(hf_shape)}")
        if name in index.dtype and index.dtype[name] not in _HF_DTYPES:
            problems.append(f"{name}: dtype {index.dtype[name]} is not supported")
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not match config.json: " + "; ".join(problems))
    return index


def load_params(path: str, cfg: ModelConfig, *, dtype: Any = jnp.float32,
                shardings: Callable[[str, tuple[int, ...]], jax.sharding.Sharding] | None = None) -> dict:
    """Load ``path``'s safetensors into our stacked param tree.

    ``shardings(param_path, shape)`` gives each parameter's sharding (default: the first device).
    Every problem (missing, unexpected, mis-shaped tensors) is collected into one error.
    """
    index = check_checkpoint(path, cfg)
    shapes = param_shapes(cfg)
    np_dtype = np.dtype(dtype)
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    flat = {}
    for pth, shape in shapes.items():
        name_t, transform = PARAM_MAP[pth]
        stacked = pth.startswith("layers/")

        def callback(idx, shape=shape, name_t=name_t, transform=transform, stacked=stacked):
            idx = tuple(s if isinstance(s, slice) else slice(s, s + 1) for s in idx)
            idx = idx + (slice(None),) * (len(shape) - len(idx))
            idx = tuple(slice(*s.indices(n)[:2]) for s, n in zip(idx, shape))
            out = _aligned_empty(tuple(s.stop - s.start for s in idx), np_dtype)
            if stacked:
                for j, layer in enumerate(range(idx[0].start, idx[0].stop)):
                    name = name_t.format(i=layer)
                    # Opened per tensor: a long-lived mmap would keep every touched page in RSS.
                    with index.open(index.file_of[name]) as h:
                        out[j] = _read_slice(h, name, transform, idx[1:], shape[1:])
            else:
                _read_blocks(index, index.file_of[name_t], name_t, transform, idx, shape, out)
            return out

        sharding = shardings(pth, shape) if shardings is not None else default
        flat[pth] = jax.make_array_from_callback(shape, sharding, callback)
    return unflatten(flat)


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A page-aligned host buffer: JAX's CPU client adopts aligned NumPy memory instead of
    copying it, so each shard exists once on the host while loading."""
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(n + 4096, np.uint8)
    start = (-raw.ctypes.data) % 4096
    return raw[start:start + n].view(dtype).reshape(shape)


# Axis of *our* layout that runs along the HF tensor's rows (its contiguous-block axis).
_ROW_AXIS = {"same": 0, "transpose": 1, "heads_out": 1, "heads_in": 2, "heads_bias": 0}


def _read_blocks(index: SafetensorsIndex, file: str, name: str, transform: str, idx: tuple[slice, ...], shape, out,
                 block_bytes: int = 64 << 20) -> None:
    """Fill ``out`` (our slice ``idx``) from a large un-stacked tensor (embeddings, LM head) in
    row blocks of at most ``block_bytes``, reopening the file per block so that mapped pages are
    released as we go rather than held for the whole tensor."""
    axis = _ROW_AXIS[transform]
    lo, hi = idx[axis].start, idx[axis].stop
    per_row = max(1, out.nbytes // max(1, hi - lo))
    step = max(1, block_bytes // per_row)
    for start in range(lo, hi, step):
        stop = min(hi, start + step)
        sub = idx[:axis] + (slice(start, stop),) + idx[axis + 1:]
        dst = (slice(None),) * axis + (slice(start - lo, stop - lo),)
        with index.open(file) as h:
            out[dst] = _read_slice(h, name, transform, sub, shape)


def _to_hf_layout(a: np.ndarray, transform: str) -> np.ndarray:
    if transform == "same":
        return a
    if transform == "transpose":
        return np.ascontiguousarray(a.T)
    if transform == "heads_out":
        d, h, hd = a.shape
        return np.ascontiguousarray(a.transpose(1, 2, 0).reshape(h * hd, d))
    if transform == "heads_in":
        h, hd, d = a.shape
        return np.ascontiguousarray(a.transpose(2, 0, 1).reshape(d, h * hd))
    if transform == "heads_bias":
        return a.reshape(-1)
    raise AssertionError(transform)


AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "chat_template.jinja", "chat_template.json", "vocab.json",
              "merges.txt", "tokenizer.model", "added_tokens.json")


def save_params(params: dict, cfg: ModelConfig, out_dir: str, *, source_dir: str | None = None,
                dtype: Any = None, max_shard_bytes: int = 2 << 30, hf_config: dict | None = None) -> str:
    """Write ``params`` as an HF checkpoint directory that transformers loads.

    Tensors are gathered one (layer) slice at a time; at most one shard file's worth of tensors
    is on the host at once. Every process must call this (gathers are collective); only process 0
    writes. ``out_dir`` may be a URL. The folder appears whole (``fileio.staged_dir``, with
    ``config.json`` as its commit file); in a bucket each shard is uploaded as soon as it is
    written, so the local disk holds one shard at a time.
    """
    flat = flatten(params)
    shapes = {k: tuple(v.shape) for k, v in flat.items()}
    expected = expected_tensors(cfg, shapes)
    out_dtype = np.dtype(dtype) if dtype is not None else None
    names = list(expected)

    def nbytes(name):
        path, _, _, hf_shape = expected[name]
        itemsize = (out_dtype or np.dtype(flat[path].dtype)).itemsize
        return int(np.prod(hf_shape)) * itemsize

    shards, current, size = [], [], 0
    for n in names:
        if current and size + nbytes(n) > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(n)
        size += nbytes(n)
    shards.append(current)

    primary = jax.process_index() == 0
    # Every process gathers (collectives); process 0 alone stages and publishes the folder.
    with (staged_dir(out_dir, "config.json") if primary else contextlib.nullcontext()) as stage:
        weight_map, total = {}, 0
        for si, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name in shard:
                path, transform, layer, _ = expected[name]
                a = to_host(flat[path][layer] if layer is not None else flat[path])
                a = _to_hf_layout(a.astype(out_dtype) if out_dtype is not None else a, transform)
                tensors[name] = a
                weight_map[name] = fname
                total += a.nbytes
            if primary:
                save_file(tensors, os.path.join(stage.path, fname), metadata={"format": "pt"})
                stage.flush(fname)  # into the bucket now, when the target is one
            del tensors
        if not primary:
            return os.fspath(out_dir)
        if len(shards) > 1:
            with open(os.path.join(stage.path, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        config = dict(hf_config or {})
        if source_dir is not None:
            config = {**json.loads(read_text(os.path.join(source_dir, "config.json"))), **config}
            local_copy(source_dir, AUX_FILES, stage.path)
        if not config:
            raise CheckpointError("save_params needs source_dir or hf_config to write config.json")
        some = flat[next(iter(flat))]
        config["torch_dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[
            str(out_dtype or some.dtype)]
        config.pop("dtype", None)
        with open(os.path.join(stage.path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    return os.fspath(out_dir)


def weights_digest(path: str, sample_bytes: int = 1 << 16, samples: int = 16) -> str:
    """A cheap content digest of a checkpoint's weights: the safetensors headers plus evenly
    spaced byte samples of every file. Hashing 64 GB in full would take minutes; a sample still
    changes whenever training touched the weights."""
    index = SafetensorsIndex(path)
    h = hashlib.sha256()
    for full in sorted(set(index.file_of.values())):
        size = as_path(full).stat().length
        h.update(f"{os.path.basename(full)}:{size}".encode())
        with as_path(full).open("rb") as f:
            for k in range(samples):
                f.seek(max(0, min(size - sample_bytes, k * size // samples)))
                h.update(f.read(sample_bytes))
    return h.hexdigest()[:16]
