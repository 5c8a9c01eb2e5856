"""The one timing harness of bench/: alternated runs, medians, spread, and a load check.

Every CPU timing script in this folder compares implementations through ``compare``:

* warm-up: each side is called ``warmup`` times first (jit compilation, allocator and thread
  pool start-up); those calls are timed and reported on their own, never in a ratio;
* timed runs alternate the sides round by round (A B A B ... or A B C A B C ...), ``rounds`` >= 5
  by default, so that a burst of load from another process lands on both sides of a round
  instead of on one side's whole block;
* per side the median run time; per other side the median over rounds of
  ``time(side) / time(first side)`` (how many times longer it took than the first side, i.e.
  the first side's speed-up) with its min-max over rounds: a wide spread says the machine was
  not quiet enough for the median to mean much;
* ``os.getloadavg()`` is read before the warm-up and after the last run. If the 1-minute load
  average exceeds ``os.cpu_count()`` at either point the headline ratio is withheld: the line
  reads ``NO HEADLINE: load average X > N cores`` and the JSON record has ``"headline": false``.
  A script whose comparisons were refused exits with status ``EXIT_NO_HEADLINE`` (3).

A side may return ``Measured(seconds, value)`` instead of a plain value when it knows a cleaner
interval than its own wall time (e.g. a training call that compiles inside and reports its
compile-free time); the harness then uses those seconds.

Script use::

    parser = argparse.ArgumentParser(...)
    _timing.add_arguments(parser)            # --rounds, --warmup, --json
    args = parser.parse_args()
    session = _timing.Session.from_args(args, "features")
    res = session.compare("same batch", {"ours": f, "transformers": g}, work=n_tokens, unit="tokens")
    session.finish(extra={...})               # writes --json, returns the exit status
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Mapping

EXIT_NO_HEADLINE = 3
DEFAULT_ROUNDS = 5


@dataclasses.dataclass(frozen=True)
class Measured:
    """A side's return value when it times itself: ``seconds`` replaces the call's wall time."""
    seconds: float
    value: Any = None


@dataclasses.dataclass
class Comparison:
    label: str
    names: list[str]
    warmup_s: dict[str, list[float]]
    times: dict[str, list[float]]  # per side, one entry per round
    load_before: float
    load_after: float
    cores: int
    outputs: dict[str, Any]  # each side's last return value (for correctness checks)
    work: float | None = None
    unit: str | None = None

    @property
    def headline(self) -> bool:
        return max(self.load_before, self.load_after) <= self.cores

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratios(self, name: str) -> list[float]:
        """time(name) / time(first side), one per round (> 1: the first side is faster)."""
        base = self.times[self.names[0]]
        return [t / b for t, b in zip(self.times[name], base)]

    def ratio(self, name: str) -> tuple[float, float, float]:
        """(median, min, max) over rounds of ``ratios(name)``."""
        r = self.ratios(name)
        return statistics.median(r), min(r), max(r)

    def to_json(self) -> dict:
        out = {"label": self.label, "sides": self.names, "headline": self.headline,
               "load_before": self.load_before, "load_after": self.load_after, "cores": self.cores,
               "rounds": len(self.times[self.names[0]]), "warmup_s": self.warmup_s, "times_s": self.times,
               "median_s": {n: self.median(n) for n in self.names}, "work": self.work, "unit": self.unit}
        out["ratio_vs_first"] = {n: dict(zip(("median", "min", "max"), self.ratio(n))) for n in self.names[1:]}
        return out

    def report(self, file=None) -> None:
        """Per side: warm-up, median and min-max run time (and throughput); then per other side
        the ratio to the first, or the load refusal instead."""
        p = lambda *a: print(*a, file=file or sys.stdout)
        rounds = len(self.times[self.names[0]])
        p(f"\n== {self.label}: {rounds} alternated rounds; load average {self.load_before:.2f} before, "
          f"{self.load_after:.2f} after ({self.cores} cores)")
        w = max(len(n) for n in self.names)
        rate = f" {self.unit + '/s':>12}" if self.work else ""
        p(f"{'':<{w}} {'warm-up':>9} {'median':>9} {'min':>9} {'max':>9}{rate}")
        for n in self.names:
            t = self.times[n]
            line = f"{n:<{w}} {sum(self.warmup_s[n]):>8.3f}s {self.median(n):>8.3f}s {min(t):>8.3f}s {max(t):>8.3f}s"
            if self.work:
                line += f" {self.work / self.median(n):>12.1f}"
            p(line)
        if not self.headline:
            p(f"NO HEADLINE: load average {max(self.load_before, self.load_after):.2f} > {self.cores} cores "
              "(per-side times above are kept for diagnosis, not as results)")
            return
        for n in self.names[1:]:
            med, lo, hi = self.ratio(n)
            p(f"{self.names[0]} speed-up vs {n}: {med:.2f}x median (min {lo:.2f}x, max {hi:.2f}x over {rounds} rounds)")


def _call(fn: Callable[[], Any], clock: Callable[[], float]) -> tuple[float, Any]:
    t = clock()
    out = fn()
    seconds = clock() - t
    if isinstance(out, Measured):
        return out.seconds, out.value
    return seconds, out


def compare(label: str, fns: Mapping[str, Callable[[], Any]], *, rounds: int = DEFAULT_ROUNDS,
            warmup: int = 1, work: float | None = None, unit: str | None = None,
            clock: Callable[[], float] = time.perf_counter,
            loadavg: Callable[[], tuple[float, float, float]] = os.getloadavg,
            cores: int | None = None) -> Comparison:
    """Time ``fns`` (the first is the one whose speed-up is reported) alternately, ``rounds``
    rounds after ``warmup`` separately timed calls of each. ``work``: the amount one call
    processes (e.g. real tokens), for a throughput column."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds={rounds} must be >= 1 and warmup={warmup} >= 0")
    names = list(fns)
    load_before = loadavg()[0]
    warm = {n: [] for n in names}
    outputs = {}
    for n in names:
        for _ in range(warmup):
            s, outputs[n] = _call(fns[n], clock)
            warm[n].append(s)
    times = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            s, outputs[n] = _call(fns[n], clock)
            times[n].append(s)
    return Comparison(label, names, warm, times, load_before, loadavg()[0], cores or os.cpu_count() or 1,
                      outputs, work, unit)


def add_arguments(parser, *, rounds: int = DEFAULT_ROUNDS) -> None:
    parser.add_argument("--rounds", type=int, default=rounds,
                        help=f"alternated timed rounds after warm-up (default {rounds}; median and min-max reported)")
    parser.add_argument("--warmup", type=int, default=1, help="separately timed warm-up calls per side")
    parser.add_argument("--json", metavar="PATH", help="also write every comparison (and the script's extras) here")


class Session:
    """The comparisons of one script run: prints each as it finishes, writes ``--json`` and
    gives the exit status (``EXIT_NO_HEADLINE`` if any headline was refused)."""

    def __init__(self, bench: str, *, rounds: int = DEFAULT_ROUNDS, warmup: int = 1, json_path: str | None = None,
                 **compare_kw):
        self.bench, self.rounds, self.warmup, self.json_path = bench, rounds, warmup, json_path
        self.compare_kw = compare_kw
        self.results: list[Comparison] = []

    @classmethod
    def from_args(cls, args, bench: str) -> "Session":
        return cls(bench, rounds=args.rounds, warmup=args.warmup, json_path=args.json)

    def compare(self, label: str, fns: Mapping[str, Callable[[], Any]], **kw) -> Comparison:
        kw = {"rounds": self.rounds, "warmup": self.warmup, **self.compare_kw, **kw}
        res = compare(label, fns, **kw)
        res.report()
        self.results.append(res)
        return res

    @property
    def headline(self) -> bool:
        return all(r.headline for r in self.results)

    def finish(self, extra: Mapping[str, Any] | None = None) -> int:
        if self.json_path:
            with open(self.json_path, "w") as f:
                json.dump({"bench": self.bench, "headline": self.headline,
                           "comparisons": [r.to_json() for r in self.results], "extra": dict(extra or {})},
                          f, indent=1, default=float)
        return 0 if self.headline else EXIT_NO_HEADLINE
