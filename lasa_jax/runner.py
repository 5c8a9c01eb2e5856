"""``run(config)``: start multi-host if asked, build one ``Context``, run ``config.stages`` in order.

The order and the stage modules are listed here, once: bottleneck -> ssi -> align -> baseline ->
evaluate, each ``lasa_jax.stages.<name>.run(ctx)``. On several processes every stage ends at a
named barrier, so nothing a stage wrote on process 0 is read by the next one before it exists.
"""
from __future__ import annotations

import logging
import time

from lasa_jax.config import stages_of
from lasa_jax.context import Context
from lasa_jax.infra import multihost
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
    for name in names:
        t0 = time.time()
        log.info("stage %s: start", name)
        STAGES[name](ctx)
        multihost.barrier(f"stage {name} done")
        log.info("stage %s: done in %.1fs", name, time.time() - t0)
    return ctx
