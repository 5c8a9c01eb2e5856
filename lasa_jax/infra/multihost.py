"""Multi-host start-up (when to call ``jax.distributed.initialize``) and the multi-host contract
every stage follows:

- **Whatever one process writes is followed by a barrier before anyone reads it.** Process 0
  alone writes reports, figures, caches and exports; ``barrier(name)`` (a named
  ``sync_global_devices`` point; a mismatch of names between processes is an error, not a hang)
  stands between the write and the first read, and the runner puts one after every stage.
- **Every decision that selects a code path is taken on process 0 and broadcast**
  (``broadcast``, ``on_primary``): does ``align/hf`` exist, is a cache entry there, where does a
  run resume. Processes that decided from their own view of a shared folder could run different
  collectives and hang.
- **Host reads of sharded arrays go through ``to_host``**, which gathers across processes.
- Progress bars and console tables appear on process 0 only (``show_progress``, ``is_primary``).

Single-process runs pay nothing: every helper returns at once when there is one process.

Call :func:`maybe_initialize` first thing in the entry point, before anything touches a JAX
backend (``jax.devices()``, ``jax.numpy`` arrays, ``jax.jit`` calls, loading a checkpoint):
JAX refuses to initialise the distributed runtime once a backend exists.

``config.distributed.initialize`` decides:

- ``"never"``: single process; nothing is called.
- ``"always"``: call ``jax.distributed.initialize`` with the configured fields; empty / 0 / -1
  fields are passed as ``None`` so JAX fills them from the cluster (Slurm, Open MPI, Cloud TPU
  metadata, ``JAX_COORDINATOR_ADDRESS`` ...).
- ``"auto"`` (default): as ``"always"``, but only when the environment shows a job of several
  processes (see :func:`detect_multiprocess`); a laptop or a single-GPU box never initialises.

What ``"auto"`` can see without a network call mirrors ``jax/_src/clusters``: Slurm (JAX checks
SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID), Open MPI
(OMPI_MCA_orte_hnp_uri), GKE TPU (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES), multislice
TPU (MEGASCALE_*). A GCE TPU VM pod only reveals its workers through the metadata server, which
we do not query here; ``launch/tpu_pod.sh`` therefore passes ``num_processes`` explicitly.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import numpy as np

from lasa_jax.config import default_distributed_config
from lasa_jax.errors import ConfigError, LasaError

log = logging.getLogger(__name__)
T = TypeVar("T")

MODES = ("auto", "always", "never")


def _section(cfg: Any) -> Mapping[str, Any]:
    """Accept the whole run config, its ``distributed`` section, or None (= defaults)."""
    merged = dict(default_distributed_config())
    if cfg is None:
        return merged
    section = cfg["distributed"] if "distributed" in cfg else cfg
    unknown = set(section.keys()) - set(merged)
    if unknown:
        raise ConfigError(f"config.distributed: unknown field(s) {sorted(unknown)} "
                         f"(known: {sorted(merged)})")
    merged.update(dict(section))
    return merged


def _parse_device_ids(text: str) -> list[int] | None:
    text = str(text).strip()
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"config.distributed.local_device_ids={text!r}: expected comma-separated "
                         "integers such as '0,1,2,3'") from None


def initialize_kwargs(cfg: Any) -> dict[str, Any]:
    """Arguments for ``jax.distributed.initialize``; unset fields become None (JAX detects)."""
    s = _section(cfg)
    num = int(s["num_processes"])
    pid = int(s["process_id"])
    if num < 0:
        raise ConfigError(f"config.distributed.num_processes={num}: must be >= 0 (0 = detect)")
    if pid < -1:
        raise ConfigError(f"config.distributed.process_id={pid}: must be >= 0, or -1 to detect")
    if num > 0 and pid >= num:
        raise ConfigError(f"config.distributed.process_id={pid} must be < num_processes={num}")
    return {
        "coordinator_address": str(s["coordinator_address"]) or None,
        "num_processes": num if num > 0 else None,
        "process_id": pid if pid >= 0 else None,
        "local_device_ids": _parse_device_ids(s["local_device_ids"]),
    }


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        return None


def detect_multiprocess(cfg: Any = None, environ: Mapping[str, str] | None = None) -> str | None:
    """Why this looks like a multi-process job, or None if it looks like a single process."""
    env = os.environ if environ is None else environ
    s = _section(cfg)
    if str(s["coordinator_address"]):
        return "config.distributed.coordinator_address is set"
    if int(s["num_processes"]) > 1:
        return f"config.distributed.num_processes={int(s['num_processes'])}"
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS is set"
    slurm_vars = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                  "SLURM_LOCALID")
    # Inside `sbatch` but outside `srun` the step variables are missing and JAX would not detect
    # Slurm either; one task is a single process.
    if all(v in env for v in slurm_vars) and (_int_env(env, "SLURM_NTASKS") or 1) > 1:
        return f"Slurm job step with SLURM_NTASKS={env['SLURM_NTASKS']}"
    if "OMPI_MCA_orte_hnp_uri" in env and (_int_env(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return f"Open MPI job with OMPI_COMM_WORLD_SIZE={env['OMPI_COMM_WORLD_SIZE']}"
    for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        hosts = [h for h in env.get(name, "").split(",") if h.strip()]
        if len(hosts) > 1:
            return f"{name} lists {len(hosts)} TPU workers"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS") or (_int_env(env, "MEGASCALE_NUM_SLICES") or 1) > 1:
        return "multislice TPU (MEGASCALE_* set)"
    return None


def decide(cfg: Any = None, environ: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """(initialise?, reason) for the configured mode and this environment. Pure; no JAX calls."""
    mode = str(_section(cfg)["initialize"])
    if mode not in MODES:
        raise ConfigError(f"config.distributed.initialize={mode!r}: expected one of {list(MODES)}")
    if mode == "never":
        return False, "config.distributed.initialize='never'"
    if mode == "always":
        return True, "config.distributed.initialize='always'"
    why = detect_multiprocess(cfg, environ)
    if why is None:
        return False, "auto: no multi-process environment detected (single process)"
    return True, f"auto: {why}"


def maybe_initialize(cfg: Any = None) -> bool:
    """Initialise ``jax.distributed`` if the config/environment asks for it.

    Must run before any JAX computation. Returns True when the distributed runtime is up after
    the call (started here or earlier), False for a single-process run. Never initialises twice.
    """
    want, reason = decide(cfg)
    if jax.distributed.is_initialized():
        log.info("jax.distributed already initialised; not initialising again (%s)", reason)
        return True
    if not want:
        log.info("jax.distributed not initialised: %s", reason)
        return False
    kwargs = initialize_kwargs(cfg)
    if jax.config.jax_cpu_collectives_implementation is None:
        # Without CPU collectives a CPU-only multi-process job (the tests, a CPU cluster) fails at
        # its first cross-process computation; gloo is JAX's default, restored if unset.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    env = os.environ
    if (kwargs["local_device_ids"] is None and "SLURM_LOCALID" in env
            and env.get("SLURM_NTASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "")).startswith("1")):
        # JAX's Slurm detection assumes one process per GPU and would show this process only
        # the GPU numbered SLURM_LOCALID, leaving the node's other GPUs idle.
        log.warning("Slurm runs one task on this node but config.distributed.local_device_ids is "
                    "empty: JAX will use only GPU %s. Pass e.g. "
                    "--config.distributed.local_device_ids=0,1,2,3,4,5,6,7", env["SLURM_LOCALID"])
    shown = {k: ("<detect>" if v is None else v) for k, v in kwargs.items()}
    log.info("jax.distributed.initialize(%s) because %s", shown, reason)
    jax.distributed.initialize(**kwargs)
    info = process_info()
    log.info("jax.distributed up: process %d of %d, %d local / %d global devices",
             info["process_index"], info["process_count"], info["local_device_count"],
             info["device_count"])
    return True


def is_primary() -> bool:
    """True on the process that writes reports, figures and exported checkpoints."""
    return jax.process_index() == 0


def process_info() -> dict[str, Any]:
    """Where this process sits in the job (for logs and run metadata)."""
    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_device_count": jax.local_device_count(),
        "device_count": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "distributed": jax.distributed.is_initialized(),
    }


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as NumPy on every process (an all-gather when it spans several hosts).
    Every host read of a sharded array goes through here."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:  # every process holds all of it already
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def show_progress(progress: bool) -> bool:
    """Whether this process draws the progress bars a stage asked for (process 0 only)."""
    return bool(progress) and is_primary()


def barrier(name: str) -> None:
    """Wait until every process has reached the sync point ``name``. Names must match across
    processes (JAX checks), so a process that took another code path fails instead of hanging."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"lasa_jax:{name}")


def broadcast(value: Any) -> Any:
    """Process 0's ``value`` (anything JSON can hold) on every process; other processes' values
    are ignored. JSON round-trips tuples as lists."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    data = json.dumps(value).encode() if is_primary() else b""
    n = int(multihost_utils.broadcast_one_to_all(np.asarray(len(data), np.int32)))
    # Lengths rounded up to a power of two: a handful of compiled broadcast shapes per run.
    buf = np.zeros(1 << max(n - 1, 0).bit_length(), np.uint8)
    buf[:len(data)] = np.frombuffer(data, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return json.loads(out[:n].tobytes().decode())


def on_primary(fn: Callable[[], T]) -> T:
    """``fn()`` run on process 0 only, its result (JSON) returned on every process; no process
    returns before process 0 has finished ``fn`` (what it wrote can be read after this). An
    error there is raised everywhere (a ``LasaError`` with the same message on the other
    processes), so no process is left waiting at the next collective."""
    if jax.process_count() == 1:
        return fn()
    outcome: dict[str, Any] = {}
    failure: BaseException | None = None
    if is_primary():
        try:
            outcome = {"value": fn()}
        except BaseException as e:  # noqa: BLE001  re-raised below, after the others know
            failure = e
            outcome = {"error": str(e), "user": isinstance(e, LasaError)}
    outcome = broadcast(outcome)
    if failure is not None:
        raise failure
    if "error" in outcome:
        if outcome["user"]:
            raise LasaError(outcome["error"])
        raise RuntimeError(f"process 0 failed: {outcome['error']}")
    return outcome["value"]
