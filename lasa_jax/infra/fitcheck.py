"""Will this stage fit in device memory? A back-of-envelope estimate checked before any weights
are loaded, so a 32B run on a too-small mesh fails in a second with a mesh to try instead of
after twenty minutes of checkpoint loading with an XLA out-of-memory dump.

All terms are bytes per device. Sharding follows the project's mesh (axes data, fsdp, tensor):
parameters and optimizer state are split over fsdp*tensor and replicated over data; the batch is
split over data*fsdp; attention heads, the MLP width and the vocabulary are split over tensor.

Align (Latent KTO, ``lasa_jax.method.trainer``) holds, per device (N = parameters,
P = fsdp*tensor, m / c / p = bytes of the master / compute / param dtype):

- master_params N*m/P and optimizer 2*N*m/P (AdamW moments take the masters' dtype), and for
  ``reference = "per_step"`` reference_params N*p/P (plus, under FSDP, its embedding and head
  gathered whole); the base model itself is released before training;
- then the larger of two phases. Forward/backward of a micro-batch: compute_params N*c/P (the
  masters cast once per step; absent when c is the master dtype), gradients N*c/P, with
  grad_accum > 1 a float32 gradient_accumulator N*4/P, the saved activations (below) and the
  larger transient working set of the loss (three float32 (b, T, V/tensor) arrays: logits,
  softmax, gradient; under FSDP the LM head gathered whole) or of one decoder layer (the "none"
  term below; under FSDP the layer's gathered weights). The update: the float32 gradients it
  reads (the accumulator, or one micro-batch's gradients and their float32 cast).

Activation model (tok = per-device tokens of one micro-batch = b*T with
b = B/(grad_accum*data*fsdp), q = heads*head_dim/tensor, kv = kv_heads*head_dim/tensor,
f = intermediate/tensor, S = b * heads/tensor * T^2 attention-score elements, XLA attention). As
in lasa_jax.infra.mesh, a dimension that tensor does not divide is replicated, not split:

- saved per decoder layer for the backward pass (align only), by remat policy
    none : tok*(6d + 3q + 3kv + 5f)*c + S*(4+c)  (residual, two norms' normalised and scaled
           outputs, residual after attention, q/k/v and rotated q/k, attention output,
           gate/up/sigmoid/act/product; float32 scores and probabilities in c)
    dots : tok*(3d + 2q + 2kv + 2f)*c + S*c   (layer input + every matmul output, incl. QK^T)
    dots_no_batch : tok*(3d + q + 2kv + 2f)*c (projections only; attention's batched matmuls
           QK^T and PV are recomputed)
    full : tok*d*c                             (only the scanned layer's input)
- workspace (other stages): one layer's full working set (the "none" term).
- KV cache (generate): 2 * layers * B/(data*fsdp) * cache_len * kv * c.

Parameters are counted as num_params * bytes / (fsdp*tensor); the few replicated vectors (norm
scales) and, when tensor exceeds the KV heads, the replicated K/V projections are a rounding
error next to that. The terms model the bytes live at the peak; XLA's buffer assignment packs
them with some fragmentation, and the runtime reserves memory of its own: that is what
``headroom`` (default: use 90 % of the device) is for. Cross-checked against XLA's own
``memory_analysis()`` of the compiled align step (tests/test_fitcheck.py; the 7 paper models in
bench/align_memory.py and bench/RESULTS.md).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from lasa_jax.errors import ConfigError, FitError

GiB = 1024 ** 3
STAGES = ("features", "ssi", "align", "generate")
# The model's remat policies (lasa_jax.model.transformer), in order of increasing recompute.
REMAT_POLICIES = ("none", "dots", "dots_no_batch", "full")
REFERENCES = ("precomputed", "per_step")
MESH_AXES = ("data", "fsdp", "tensor")
# Optimizer moments kept per parameter.
_OPT_MOMENTS = {"adamw": 2, "adam": 2, "lion": 1, "momentum": 1, "sgd": 0}

def dtype_bytes(name: str) -> int:
    try:
        return np.dtype(_ml_dtype(name)).itemsize
    except TypeError:
        raise ConfigError(f"unknown dtype {name!r} (e.g. float32, bfloat16, float16)") from None


def _ml_dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes  # shipped with jax; numpy alone has no bfloat16
        return ml_dtypes.bfloat16
    return name


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"fitcheck: {field}={value!r} is not one of {list(allowed)}")


def _check_mesh(mesh_shape: Mapping[str, int]) -> dict[str, int]:
    extra = set(mesh_shape) - set(MESH_AXES)
    if extra:
        raise ValueError(f"fitcheck: mesh_shape has unknown axes {sorted(extra)} (known: {MESH_AXES})")
    out = {}
    for axis in MESH_AXES:
        n = int(mesh_shape.get(axis, 1))
        if n < 1:
            raise ValueError(f"fitcheck: mesh_shape[{axis!r}]={n}; resolve -1 first (lasa_jax.infra.mesh.resolve_mesh_shape)")
        out[axis] = n
    return out


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Per-device memory of one stage on one mesh. ``breakdown`` maps term -> bytes."""
    model: Any  # lasa_jax.model.config.ModelConfig
    stage: str
    mesh_shape: dict[str, int]
    settings: dict[str, Any]
    breakdown: dict[str, float]
    # align: the terms of each phase ("backward": forward and backward of a micro-batch,
    # "update": the optimizer step); ``breakdown`` holds those of the larger one.
    phases: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    @property
    def total(self) -> float:
        return float(sum(self.breakdown.values()))

    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh_shape.values())

    def biggest(self) -> tuple[str, float]:
        return max(self.breakdown.items(), key=lambda kv: kv[1])

    def flags(self) -> str:
        """Command-line overrides that select this estimate's mesh (and remat for align)."""
        parts = [f"--config.mesh.{a}={self.mesh_shape[a]}" for a in MESH_AXES]
        if self.stage == "align":
            parts.append(f"--config.model.remat={self.settings['remat']}")
        return " ".join(parts)

    def __str__(self) -> str:
        mesh = ", ".join(f"{a}={self.mesh_shape[a]}" for a in MESH_AXES)
        s = self.settings
        head = (f"{self.stage}: {self.model.num_params() / 1e9:.2f}B params, mesh {mesh} "
                f"({self.num_devices} device(s)), batch {s['batch_size']} x {s['seq_len']} "
                f"tokens, params {s['param_dtype']}, compute {s['compute_dtype']}")
        if self.stage == "align":
            head += (f", masters and {s['optimizer']} state {s['master_dtype']}, remat {s['remat']}, "
                     f"{s['grad_accum']} micro-batch(es), reference {s['reference']}")
        width = max(len(k) for k in [*self.breakdown, "total"])
        rows = [f"  {k:<{width}}  {v / GiB:9.2f} GiB" for k, v in self.breakdown.items()]
        rows.append(f"  {'total':<{width}}  {self.total / GiB:9.2f} GiB per device")
        return "\n".join([head, *rows])


def estimate(model: Any, *, stage: str, mesh_shape: Mapping[str, int],
             param_dtype: str = "bfloat16", compute_dtype: str = "bfloat16",
             batch_size: int, seq_len: int, remat: str = "full", optimizer: str = "adamw",
             master_dtype: str = "float32", grad_accum: int = 1, reference: str = "precomputed",
             kv_cache_len: int | None = None, ssi_hidden: int | None = None) -> Estimate:
    """Bytes per device for ``stage`` of ``model`` (a ``lasa_jax.model.config.ModelConfig``) on
    ``mesh_shape`` (see the module docstring)."""
    _check_choice("stage", stage, STAGES)
    _check_choice("remat", remat, REMAT_POLICIES)
    _check_choice("reference", reference, REFERENCES)
    _check_choice("optimizer", optimizer, tuple(_OPT_MOMENTS))
    if batch_size < 1 or seq_len < 1 or grad_accum < 1 or batch_size % grad_accum:
        raise ValueError(f"fitcheck: batch_size={batch_size} and seq_len={seq_len} must be >= 1 and "
                         f"batch_size divisible by grad_accum={grad_accum}")
    mesh = _check_mesh(mesh_shape)
    settings = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, batch_size=batch_size,
                    seq_len=seq_len, remat=remat, optimizer=optimizer, master_dtype=master_dtype,
                    grad_accum=grad_accum, reference=reference, kv_cache_len=kv_cache_len,
                    ssi_hidden=ssi_hidden)
    p_bytes, c, m_bytes = dtype_bytes(param_dtype), dtype_bytes(compute_dtype), dtype_bytes(master_dtype)
    t = mesh["tensor"]
    param_shards = mesh["fsdp"] * t
    n_params = model.num_params()

    d, T = model.hidden_size, seq_len
    # Rows of one micro-batch on one device: align runs (and keeps activations of) one at a time.
    rows = batch_size // grad_accum if stage == "align" else batch_size
    b = math.ceil(rows / (mesh["data"] * mesh["fsdp"]))
    heads = _split(model.num_heads, t)
    q = heads * model.head_dim
    kv = _split(model.num_kv_heads, t) * model.head_dim
    f = _split(model.intermediate_size, t)
    vocab = _split(model.vocab_size, t)
    tok = b * T
    scores = b * heads * T * T
    layer_all = tok * (6 * d + 3 * q + 3 * kv + 5 * f) * c + scores * (4 + c)

    out: dict[str, float] = {}
    phases: dict[str, dict[str, float]] = {}
    if stage == "align":
        # Mixed precision (lasa_jax.method.trainer): masters and moments in master_dtype, one cast
        # of the masters to the compute dtype, gradients in the compute dtype, summed over
        # micro-batches in float32. The base weights are released before training unless they
        # are the per-step reference.
        shard = n_params / param_shards
        vocab_mats = 1 if model.tie_embeddings else 2
        out["master_params"] = shard * m_bytes
        out["optimizer"] = _OPT_MOMENTS[optimizer] * shard * m_bytes
        if reference == "per_step":
            # The frozen reference in its own dtype; under FSDP XLA also keeps its embedding and
            # LM head gathered for the reference forwards of every step.
            out["reference_params"] = shard * p_bytes + (vocab_mats * vocab * d * p_bytes if mesh["fsdp"] > 1 else 0)
        # The rest depends on the phase: forward and backward of a micro-batch, or the update.
        backward: dict[str, float] = {}
        if compute_dtype != master_dtype:
            backward["compute_params"] = shard * c
        backward["gradients"] = shard * c
        if grad_accum > 1:
            backward["gradient_accumulator"] = shard * 4
        saved = {"none": layer_all,
                 "dots": tok * (3 * d + 2 * q + 2 * kv + 2 * f) * c + scores * c,
                 "dots_no_batch": tok * (3 * d + q + 2 * kv + 2 * f) * c,
                 "full": tok * d * c}[remat]
        backward["saved_activations"] = float(model.num_layers * saved)
        # The larger transient working set of the loss (float32 logits, softmax and gradient;
        # under FSDP the LM head gathered whole, split only by tensor) and of one decoder layer
        # (its full working set; under FSDP its gathered weights).
        fsdp = mesh["fsdp"] > 1
        layer_params = (n_params - model.vocab_size * d * vocab_mats) / model.num_layers
        loss_set = 3 * tok * vocab * 4 + (vocab * d * c if fsdp else 0)
        layer_set = layer_all + (layer_params / t * c if fsdp else 0)
        if loss_set >= layer_set:
            backward["loss_working_set"] = float(loss_set)
        else:
            backward["layer_working_set"] = float(layer_set)
        # The update reads float32 gradients: the accumulator, or one micro-batch's gradients
        # and their float32 cast.
        update = {"gradient_accumulator": shard * 4} if grad_accum > 1 else \
            {"gradients": shard * c, **({"gradients_float32": shard * 4} if compute_dtype != "float32" else {})}
        phases = {"backward": backward, "update": update}
        out.update(max(backward, update, key=lambda terms: sum(terms.values())))
    else:
        out["params"] = n_params * p_bytes / param_shards
    if stage == "ssi":
        h = ssi_hidden or d
        probe = d * h + h + 2 * h + h + 1  # Linear(d,H), LayerNorm(H), Linear(H,1)
        out["ssi_probe"] = float(probe * 4 * (2 + _OPT_MOMENTS["adamw"]))  # fp32 w, grad, moments
    if stage == "generate":
        cache = kv_cache_len or seq_len
        out["kv_cache"] = float(2 * model.num_layers * b * cache * kv * c)
        out["logits"] = float(b * vocab * 4)
    if stage != "align":
        out["workspace"] = float(layer_all)
    return Estimate(model=model, stage=stage, mesh_shape=mesh, settings=settings, breakdown=out,
                    phases=phases)


def _split(dim: int, n: int) -> int:
    """Per-device size of a dimension over a mesh axis of ``n``: replicated unless n divides it."""
    return dim // n if dim % n == 0 else dim


def device_memory_bytes() -> int | None:
    """Memory one local device may allocate, or None where JAX does not say (CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"])


def factorizations(n: int) -> Iterator[dict[str, int]]:
    """Every (data, fsdp, tensor) with data*fsdp*tensor == n."""
    divisors = [k for k in range(1, n + 1) if n % k == 0]
    for t, f in itertools.product(divisors, divisors):
        if n % (t * f) == 0:
            yield {"data": n // (t * f), "fsdp": f, "tensor": t}


def _valid_mesh(model: Any, mesh: Mapping[str, int], batch_size: int) -> bool:
    t = mesh["tensor"]
    kv = model.num_kv_heads
    return (model.num_heads % t == 0 and model.intermediate_size % t == 0
            and (kv % t == 0 or t % kv == 0) and model.hidden_size % mesh["fsdp"] == 0
            and batch_size % (mesh["data"] * mesh["fsdp"]) == 0)


def _cost(est: Estimate) -> tuple[int, int, int]:
    # Cheapest first: least recomputation, then least tensor-parallel traffic (it sits on every
    # matmul), then least FSDP all-gathering; pure data parallelism last in communication.
    remat = REMAT_POLICIES.index(est.settings["remat"]) if est.stage == "align" else 0
    return remat, est.mesh_shape["tensor"], est.mesh_shape["fsdp"]


def candidates(est: Estimate, num_devices: int | None = None) -> list[Estimate]:
    """Re-estimates of ``est`` on every valid mesh of ``num_devices`` (and every remat policy
    for align), cheapest first."""
    n = num_devices or est.num_devices
    kwargs = {k: v for k, v in est.settings.items()}
    remats = REMAT_POLICIES if est.stage == "align" else (est.settings["remat"],)
    out = []
    for mesh in factorizations(n):
        if not _valid_mesh(est.model, mesh, est.settings["batch_size"]):
            continue
        for remat in remats:
            out.append(estimate(est.model, stage=est.stage, mesh_shape=mesh,
                                **{**kwargs, "remat": remat}))
    return sorted(out, key=_cost)


def suggest(est: Estimate, device_bytes: float, *, headroom: float = 0.9,
            num_devices: int | None = None) -> Estimate | None:
    """The cheapest mesh/remat on ``num_devices`` (default: as many as ``est``) that fits."""
    budget = device_bytes * headroom
    return next((c for c in candidates(est, num_devices) if c.total <= budget), None)


def check_fit(est: Estimate, device_bytes: float | None, *, headroom: float = 0.9,
              max_devices: int = 8192) -> None:
    """Raise :class:`FitError` if ``est`` needs more than ``headroom`` of ``device_bytes``.

    ``device_bytes`` None (CPU, unknown) skips the check. The message names the cheapest mesh
    that fits on the same devices, or else the smallest power-of-two multiple of devices that
    would fit and a mesh for it.
    """
    if device_bytes is None:
        return
    if not 0 < headroom <= 1:
        raise ValueError(f"fitcheck: headroom={headroom} must be in (0, 1]")
    budget = device_bytes * headroom
    if est.total <= budget:
        return
    name, size = est.biggest()
    mesh = ", ".join(f"{a}={est.mesh_shape[a]}" for a in MESH_AXES)
    msg = (f"{est.stage} needs {est.total / GiB:.1f} GiB per device but only {budget / GiB:.1f} "
           f"GiB is usable ({headroom:.0%} of {device_bytes / GiB:.1f} GiB) on mesh {mesh}; "
           f"biggest term: {name} {size / GiB:.1f} GiB.")
    better = suggest(est, device_bytes, headroom=headroom)
    if better is not None:
        msg += (f" Try {better.flags()} ({better.total / GiB:.1f} GiB per device).")
    else:
        n = est.num_devices * 2
        while n <= max_devices and better is None:
            better = suggest(est, device_bytes, headroom=headroom, num_devices=n)
            n *= 2
        if better is not None:
            msg += (f" No mesh of {est.num_devices} device(s) fits; use at least "
                    f"{better.num_devices} devices of this size, e.g. {better.flags()} "
                    f"({better.total / GiB:.1f} GiB per device).")
        else:
            msg += (f" No mesh of up to {max_devices} such devices fits with batch_size="
                    f"{est.settings['batch_size']}; lower the batch or sequence length.")
    raise FitError(msg + "\n" + str(est))
