"""Sequence packing: many prompts per row, so a forward computes almost no padding.

A batch is up to ``rows`` rows of ``width`` slots; each row holds whole prompts one after another
(segments 1, 2, ... of that row; 0 marks the padding at its end). ``Transformer`` keeps segments
apart (``segment_ids``: each attends only to itself, its positions restart at 0), so a prompt's
hidden states are those of the prompt alone.

Batches are filled first-fit from the longest prompt down: the longest remaining prompt sets the
batch's width (rounded up by ``width_of``), every remaining prompt goes into the first row with
room for it, and the batch closes when no remaining prompt fits. Long prompts thus share batches
with long ones, and short prompts fill the ends of their rows.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    tokens: np.ndarray       # (rows, width) int32
    segment_ids: np.ndarray  # (rows, width) int32, 0 = padding
    last: np.ndarray         # (rows, K) int32: slot of each segment's last token (0 where unused)
    items: list[tuple[int, int, int]]  # (prompt index, row, segment slot k) per packed prompt

    @property
    def padding_fraction(self) -> float:
        return float((self.segment_ids == 0).mean())


def ladder(n: int, *, per_octave: int = 4, multiple: int = 1) -> int:
    """n rounded up to one of ``per_octave`` steps per octave (at most 100 / per_octave % over
    n), the step a multiple of ``multiple``: sizes repeat across batches and runs, so a run
    compiles few shapes."""
    step = max(1, (1 << max(0, int(n) - 1).bit_length()) // (2 * per_octave))
    step = -(-step // multiple) * multiple
    return -(-int(n) // step) * step


def row_width(n: int, minimum: int = 16) -> int:
    """Row width for a longest prompt of n tokens: ``ladder(n)`` (at most 25 % over n). Rows
    are filled with shorter prompts, so the rounding costs little padding; finer steps would cost
    compiles."""
    return max(minimum, ladder(n))


def pack(ids: Sequence[Sequence[int]], *, rows: int, pad_id: int, row_multiple: int = 1,
         width_of: Callable[[int], int] = row_width, min_segments: int = 8) -> list[PackedBatch]:
    """Pack token lists into batches of at most ``rows`` rows (see the module docstring).
    ``width_of(n)`` is the row width for a longest prompt of n tokens (>= n). A batch that needs
    fewer rows (the last one, or a wide one holding everything left) gets the smallest power of
    two that holds the remaining tokens, rounded up to ``row_multiple`` (the data-parallel size).
    K, the segment slots per row, is a power of two >= ``min_segments``. Row counts, widths and
    K thus take few values: a run compiles a handful of shapes."""
    if rows < 1 or row_multiple < 1 or rows % row_multiple:
        raise ValueError(f"pack: rows ({rows}) must be a positive multiple of row_multiple ({row_multiple})")
    lengths = [len(x) for x in ids]
    if any(n == 0 for n in lengths):
        raise ValueError(f"pack: prompt {lengths.index(0)} has no tokens")
    remaining = longest_first(lengths)
    batches = []
    while remaining:
        width = width_of(lengths[remaining[0]])
        need = -(-sum(lengths[i] for i in remaining) // width)
        n_rows = min(rows, -(-(1 << max(0, need - 1).bit_length()) // row_multiple) * row_multiple)
        placed, remaining = first_fit(lengths, remaining, width, n_rows)
        batches.append(_arrays(ids, placed, width, pad_id, min_segments))
    return batches


def longest_first(lengths: Sequence[int]) -> list[int]:
    """Indices by decreasing length; ties keep input order (sorted is stable)."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def first_fit(lengths: Sequence[int], order: Sequence[int], width: int,
              n_rows: int | None = None) -> tuple[list[list[int]], list[int]]:
    """Place items (indices into ``lengths``, in ``order``) into rows of ``width`` slots, each into
    the first row with room. With ``n_rows`` the rows are fixed and what fits nowhere is returned
    as left over; without, a new row opens when none has room. Returns (rows, left over)."""
    free = [width] * (n_rows or 0)
    placed: list[list[int]] = [[] for _ in free]
    left = []
    for i in order:
        if lengths[i] > width:
            raise ValueError(f"first_fit: item {i} has {lengths[i]} tokens, more than a row's {width}")
        r = next((r for r in range(len(free)) if free[r] >= lengths[i]), None)
        if r is None and n_rows is None:
            free.append(width)
            placed.append([])
            r = len(free) - 1
        if r is None:
            left.append(i)
            continue
        placed[r].append(i)
        free[r] -= lengths[i]
    return placed, left


def _arrays(ids, placed, width, pad_id, min_segments) -> PackedBatch:
    rows = len(placed)
    most = max(len(p) for p in placed)
    K = max(min_segments, 1 << max(0, most - 1).bit_length())
    tokens = np.full((rows, width), pad_id, np.int32)
    segments = np.zeros((rows, width), np.int32)
    last = np.zeros((rows, K), np.int32)
    items = []
    for r, row in enumerate(placed):
        at = 0
        for k, i in enumerate(row):
            n = len(ids[i])
            tokens[r, at:at + n] = ids[i]
            segments[r, at:at + n] = k + 1
            last[r, k] = at + n - 1
            items.append((i, r, k))
            at += n
    return PackedBatch(tokens, segments, last, items)


def choose_shapes(needs: np.ndarray, limit: int) -> np.ndarray:
    """(n, k) int sizes each batch needs (rows of each kind) -> (n, k): each batch's sizes taken
    from at most ``limit`` distinct shapes, every shape covering what its batches need (>= in
    every column). Greedy: start from the largest need, then add the needed shape that lowers
    the total (sum of sizes over batches) most, until ``limit`` or no gain. ``limit`` is the
    number of compiled programs a run may make."""
    needs = np.asarray(needs, np.int64)
    pairs, counts = np.unique(needs, axis=0, return_counts=True)

    def assign(chosen):
        ch = np.asarray(chosen)
        covers = (ch[None, :, :] >= pairs[:, None, :]).all(-1)
        cost = np.where(covers, ch.sum(1)[None, :], np.iinfo(np.int64).max)
        return cost.argmin(1), int((cost.min(1) * counts).sum())

    chosen = [tuple(pairs.max(0))]
    total = assign(chosen)[1]
    while len(chosen) < limit:
        options = [(assign(chosen + [tuple(p)])[1], tuple(p)) for p in pairs if tuple(p) not in chosen]
        if not options or min(options)[0] >= total:
            break
        total, best = min(options)
        chosen.append(best)
    which, _ = assign(chosen)
    shape_of = {tuple(p): chosen[w] for p, w in zip(pairs, which)}
    return np.asarray([shape_of[tuple(n)] for n in needs], np.int64).reshape(needs.shape)
