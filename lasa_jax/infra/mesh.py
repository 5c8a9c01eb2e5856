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
