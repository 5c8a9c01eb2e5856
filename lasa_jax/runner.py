"""``run(config)``: start multi-host if asked, take the workdir, check every input, then run
``config.stages`` in order.

The order and the stage modules are listed here, once: bottleneck -> ssi -> align -> baseline ->
evaluate, each ``lasa_jax.stages.<name>.run(ctx)``. Before any stage: process 0 takes the workdir
lock (``lasa_jax.infra.lock``; a second run on the same workdir stops at once) and every process
runs the preflight (``lasa_jax.preflight``), so a bad field or file is reported before hours of
compute, not after them. On several processes every stage ends at a named barrier, so nothing a
stage wrote on process 0 is read by the next one before it exists.
"""
from __future__ import annotations

import contextlib
import logging
import time

from lasa_jax import preflight
from lasa_jax.config import stages_of
from lasa_jax.context import Context
from lasa_jax.infra import fileio, multihost
from lasa_jax.infra.lock import WorkdirLock
from lasa_jax.stages import align, baseline, bottleneck, evaluate, ssi

log = logging.getLogger("lasa_jax")

STAGES = {"bottleneck": bottleneck.run, "ssi": ssi.run, "align": align.run, "baseline": baseline.run,
          "evaluate": evaluate.run}


def run(config) -> Context:
    """Run ``config.stages`` in order; returns the context (its workdir holds every output)."""
    multihost.maybe_initialize(config.distributed)
    names = stages_of(config)
    if {"align", "baseline"} & set(names):
        align.check_tensorboard(config)
    ctx = Context(config)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    with _workdir_lock(ctx):
        preflight.check(ctx, names)
        for name in names:
            t0 = time.time()
            log.info("stage %s: start", name)
            STAGES[name](ctx)
            multihost.barrier(f"stage {name} done")
            log.info("stage %s: done in %.1fs", name, time.time() - t0)
    return ctx


def _workdir_lock(ctx):
    """The workdir lock, taken by process 0. Object stores (gs://) have no atomic create-if-absent
    that this lock could use, so a URL workdir runs unlocked, with a warning."""
    if not multihost.is_primary():
        return contextlib.nullcontext()
    if fileio.is_url(ctx.workdir):
        log.warning("%s: a workdir in object storage is not locked; do not start two runs on it", ctx.workdir)
        return contextlib.nullcontext()
    return WorkdirLock(ctx.workdir)
