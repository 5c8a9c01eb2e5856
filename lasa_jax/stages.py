"""Stage name -> function. Stages not built yet are absent and fail with a clear message."""
from __future__ import annotations

from lasa_jax import pipeline


def _missing(name):
    def run(_):
        raise NotImplementedError(f"stage {name!r} is not available in this version of lasa_jax")
    return run


STAGES = {
    "bottleneck": pipeline.run_bottleneck,
    "ssi": pipeline.run_ssi,
    "align": getattr(pipeline, "run_align", _missing("align")),
    "evaluate": getattr(pipeline, "run_evaluate", _missing("evaluate")),
}
