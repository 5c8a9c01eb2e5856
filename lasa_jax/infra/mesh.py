"""Device mesh and the logical-axis rules that place every array on it.

Mesh axes: ``data`` (pure data parallelism: params replicated), ``fsdp`` (batch *and* parameters
sharded, ZeRO-3 style) and ``tensor`` (heads and MLP width split, Megatron style). Each parameter
dimension has a logical name; one table maps logical names to mesh axes. A mesh axis that does
not divide a dimension is dropped for that dimension (so 8 KV heads on a tensor axis of 16, or
a 2-KV-head GQA model on tensor=4, simply replicate the KV projections) rather than failing.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lasa_jax.errors import MeshError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes it may be split over, in order.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "layers": (),
    "norm": (),
    "length": (),
}


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    sizes = [data, fsdp, tensor]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise MeshError(f"config.mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"config.mesh: sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % known:
            raise MeshError(f"config.mesh: {num_devices} devices are not divisible by {known} "
                            f"(data={data}, fsdp={fsdp}, tensor={tensor})")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(f"config.mesh: data*fsdp*tensor = {math.prod(sizes)} but there are "
                        f"{num_devices} devices (use -1 for one axis to fill)")
    return tuple(sizes)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all (or the given) devices, in Auto sharding mode so
    that XLA's partitioner propagates shardings through the model."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


# Share of one device's memory the decode copy of the weights may take; the rest is left for
# the KV cache and activations.
DECODE_WEIGHT_SHARE = 0.5


def device_memory_bytes() -> int | None:
    """Memory of one local device as the runtime reports it (None where unknown, e.g. CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def decode_tensor_size(param_bytes: int, num_devices: int, train_tensor: int,
                       device_bytes: int | None) -> int:
    """Tensor-parallel width of the decode layout. With the device memory known: the smallest
    power-of-two split (1 = fully replicated) whose weight shard fits in DECODE_WEIGHT_SHARE of a
    device, all devices if none does. Unknown memory: the training mesh's tensor width (CPU
    hosts share one memory, so replicating there costs nothing a split would save)."""
    if device_bytes is None:
        return train_tensor
    t = 1
    while t < num_devices and param_bytes / t > DECODE_WEIGHT_SHARE * device_bytes:
        t *= 2
    return t if num_devices % t == 0 else num_devices


def decode_mesh(mesh: Mesh, tensor: int) -> Mesh:
    """The same devices as (data, fsdp=1, tensor): with no fsdp axis the logical rules leave
    "embed" whole, so decoding all-gathers no weights; tensor splits heads/MLP/vocab (one
    activation all-reduce per matmul pair) and data carries the batch."""
    devices = list(mesh.devices.flat)
    if len(devices) % tensor:
        raise MeshError(f"decode tensor width {tensor} does not divide {len(devices)} devices")
    return make_mesh(len(devices) // tensor, 1, tensor, devices=devices)


COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# "%name = <result shape> <op>(" in optimised HLO; the result may be a tuple.
_COLLECTIVE = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")


def _shape_bytes(text: str) -> list[int]:
    return [math.prod(int(d) for d in dims.split(",") if d) * _itemsize(dtype)
            for dtype, dims in _ARRAY.findall(text) if dtype != "token"]


def _group_size(line: str) -> int:
    """Devices per replica group: ``replica_groups={{0,1,..}}`` or iota ``[groups,size]<=[..]``."""
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
    return len(m.group(1).split(",")) if m else 1


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """Count and bytes of each collective kind in compiled HLO (``compiled.as_text()``), once
    per instruction (a loop body counts once, i.e. per iteration). Bytes are the whole buffer
    the op assembles or reduces as one device sees it: an all-gather's result, a
    reduce-scatter's operand (result x group size), an all-reduce's, all-to-all's or
    collective-permute's result. Async pairs count at their start, whose tuple holds operand,
    result and context: the largest is the buffer. ``f32_bytes``: the float32 share."""
    out = {k: {"count": 0, "bytes": 0, "f32_bytes": 0} for k in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        shape, op, start = m.groups()
        sizes = _shape_bytes(shape)
        nbytes = max(sizes) if start else sum(sizes)
        if op == "reduce-scatter":
            nbytes *= _group_size(line)
        out[op]["count"] += 1
        out[op]["bytes"] += nbytes
        if shape.lstrip("(").startswith("f32"):
            out[op]["f32_bytes"] += nbytes
    return out


def collective_bytes(hlo_text: str) -> int:
    """Bytes of every collective of compiled HLO together (``collectives``)."""
    return sum(c["bytes"] for c in collectives(hlo_text).values())


def _itemsize(hlo_dtype: str) -> int:
    if hlo_dtype == "pred":
        return 1
    bits = re.match(r"[a-z]+([0-9]*)", hlo_dtype).group(1)  # f32, bf16, s8, f8e4m3fn
    return max(1, int(bits or 8) // 8)


def mesh_from_config(mesh_cfg) -> Mesh:
    return make_mesh(int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor))


def logical_spec(axes: Sequence[str], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for an array whose dimensions have logical names ``axes``."""
    if len(axes) != len(shape):
        raise MeshError(f"logical axes {axes} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        if name not in LOGICAL_RULES:
            raise MeshError(f"unknown logical axis {name!r}")
        chosen = []
        for ax in LOGICAL_RULES[name]:
            n = mesh.shape[ax]
            if n == 1 or ax in used:
                continue
            if dim % (math.prod(mesh.shape[a] for a in chosen) * n):
                log.debug("axis %s (%d) not divisible by mesh axis %s (%d): replicated", name, dim, ax, n)
                continue
            chosen.append(ax)
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return P(*spec)


def named_shardings(axes: dict[str, tuple[str, ...]], shapes: dict[str, tuple[int, ...]],
                    mesh: Mesh) -> dict[str, NamedSharding]:
    """NamedSharding per flat parameter path, from each dimension's logical name (declared by the
    model where the parameter is declared) and the rules above."""
    return {path: NamedSharding(mesh, logical_spec(axes[path], shape, mesh)) for path, shape in shapes.items()}


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def activation_sharding(mesh: Mesh) -> NamedSharding:
    """(batch, length, embed) activations: rows over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, logical_spec(("batch", "length", "norm"), (batch_multiple(mesh), 1, 1), mesh))


def batch_multiple(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_array(v, mesh: Mesh) -> jax.Array:
    """Place one host array (the same on every process) on the mesh, batch-sharded: each process
    hands over only the rows its devices hold."""
    v = np.asarray(v)
    return jax.make_array_from_callback(v.shape, batch_sharding(mesh, v.ndim), lambda idx: v[idx])


def put_batch(arrays: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """``put_array`` for every entry of a dict of host batch arrays."""
    return {k: put_array(v, mesh) for k, v in arrays.items()}
