"""Stage name -> function (each takes a ``pipeline.Run``), in pipeline order."""
from __future__ import annotations


def _bottleneck(run):
    from lasa_jax.pipeline import run_bottleneck
    return run_bottleneck(run)


def _ssi(run):
    from lasa_jax.pipeline import run_ssi
    return run_ssi(run)


def _align(run):
    from lasa_jax.train import run_align
    return run_align(run)


def _baseline(run):
    from lasa_jax.train import run_baseline
    return run_baseline(run)


def _evaluate(run):
    from lasa_jax.evaluate import run_evaluate
    return run_evaluate(run)


STAGES = {"bottleneck": _bottleneck, "ssi": _ssi, "align": _align, "baseline": _baseline, "evaluate": _evaluate}
