"""The optional ``baseline`` stage: plain KTO on LASA's pairs, the comparison arm.

``align``'s loop with z = 0 for every item (no refusal prefix anywhere) and no alignment term,
same data, optimiser and steps (``align.baseline_align_config``), into ``WORKDIR/baseline``
(checkpoints, resume, ``metrics.jsonl``, export to ``baseline/hf``). The evaluate stage evaluates
``baseline/hf`` ungated beside the aligned model whenever it exists.
"""
from __future__ import annotations

from lasa_jax.stages import align


def run(ctx) -> dict:
    return align.train(ctx, "baseline")
