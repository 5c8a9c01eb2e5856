"""bench/_timing.py's logic with fake clocks and functions: no model, no real timing."""
from __future__ import annotations

import json

import pytest

from bench import _timing


class FakeClock:
    """A clock that only moves when a fake side 'runs' for its scripted duration."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def side(self, log: list, name: str, durations: list[float]):
        it = iter(durations)

        def fn():
            log.append(name)
            self.now += next(it)
            return name
        return fn


def run(durations: dict[str, list[float]], load=(0.5, 0.5), rounds=5, warmup=1, cores=2):
    clock, log = FakeClock(), []
    loads = iter(load)
    fns = {n: clock.side(log, n, d) for n, d in durations.items()}
    res = _timing.compare("fake", fns, rounds=rounds, warmup=warmup, clock=clock,
                          loadavg=lambda: (next(loads), 0.0, 0.0), cores=cores)
    return res, log


def test_warmup_then_alternation_order():
    res, log = run({"a": [9, 1, 1, 1], "b": [8, 2, 2, 2], "c": [7, 3, 3, 3]}, rounds=3)
    assert log == ["a", "b", "c"] + ["a", "b", "c"] * 3  # warm-ups first, then A B C A B C ...
    assert res.warmup_s == {"a": [9], "b": [8], "c": [7]}  # timed apart, kept out of the runs
    assert res.times == {"a": [1, 1, 1], "b": [2, 2, 2], "c": [3, 3, 3]}
    assert res.outputs == {"a": "a", "b": "b", "c": "c"}


def test_median_and_ratio_spread_are_per_round():
    # Exact arithmetic on small floats; tolerance 1e-12 only for the divisions.
    res, _ = run({"ours": [0, 1.0, 2.0, 1.0, 1.0, 4.0], "ref": [0, 3.0, 2.0, 2.0, 5.0, 4.0]})
    assert res.median("ours") == 1.0 and res.median("ref") == 3.0
    assert res.ratios("ref") == pytest.approx([3.0, 1.0, 2.0, 5.0, 1.0], abs=1e-12)
    med, lo, hi = res.ratio("ref")
    # Median of the per-round ratios (2.0), not the ratio of the medians (3.0).
    assert (med, lo, hi) == pytest.approx((2.0, 1.0, 5.0), abs=1e-12)


def test_headline_printed_when_quiet(capsys):
    res, _ = run({"ours": [0] + [1.0] * 5, "ref": [0] + [2.0] * 5}, load=(1.0, 2.0), cores=2)
    assert res.headline  # 2.0 <= 2 cores: allowed (strictly greater refuses)
    res.report()
    out = capsys.readouterr().out
    assert "ours speed-up vs ref: 2.00x median (min 2.00x, max 2.00x over 5 rounds)" in out
    assert "NO HEADLINE" not in out


@pytest.mark.parametrize("load", [(2.5, 0.1), (0.1, 2.5)])
def test_load_refusal_before_or_after(load, capsys, tmp_path):
    clock, log = FakeClock(), []
    loads = iter(load)
    s = _timing.Session("fake", rounds=5, json_path=str(tmp_path / "r.json"), clock=clock,
                        loadavg=lambda: (next(loads), 9.0, 9.0), cores=2)
    s.compare("x", {"ours": clock.side(log, "ours", [1.0] * 6), "ref": clock.side(log, "ref", [2.0] * 6)})
    out = capsys.readouterr().out
    assert "NO HEADLINE: load average 2.50 > 2 cores" in out
    assert "speed-up" not in out
    assert s.finish() == _timing.EXIT_NO_HEADLINE
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["headline"] is False and rec["comparisons"][0]["headline"] is False
    assert rec["comparisons"][0]["times_s"]["ref"] == [2.0] * 5  # raw times still recorded


def test_patched_getloadavg_is_what_compare_reads(monkeypatch):
    # The default loadavg is os.getloadavg, bound at definition: patch the harness's own default.
    monkeypatch.setattr(_timing.compare, "__kwdefaults__",
                        {**_timing.compare.__kwdefaults__, "loadavg": lambda: (64.0, 0.0, 0.0), "cores": 2})
    res = _timing.compare("x", {"a": lambda: None, "b": lambda: None}, rounds=1, warmup=0)
    assert not res.headline and res.load_before == 64.0


def test_measured_replaces_wall_time_and_json_fields(tmp_path):
    clock = FakeClock()

    def self_timed():
        clock.now += 10.0  # e.g. a compile inside the call
        return _timing.Measured(0.5, "v")
    s = _timing.Session("fake", rounds=5, json_path=str(tmp_path / "r.json"), clock=clock,
                        loadavg=lambda: (0.0, 0.0, 0.0), cores=2)
    res = s.compare("m", {"ours": self_timed, "ref": clock.side([], "ref", [1.0] * 6)}, work=100, unit="tokens")
    assert res.times["ours"] == [0.5] * 5 and res.outputs["ours"] == "v"
    assert s.finish({"padding": 0.1}) == 0
    rec = json.loads((tmp_path / "r.json").read_text())
    c = rec["comparisons"][0]
    assert rec["headline"] is True and rec["extra"] == {"padding": 0.1}
    assert c["ratio_vs_first"]["ref"] == {"median": 2.0, "min": 2.0, "max": 2.0}
    assert c["median_s"] == {"ours": 0.5, "ref": 1.0} and c["rounds"] == 5 and c["work"] == 100


def test_bad_arguments():
    with pytest.raises(ValueError):
        _timing.compare("x", {"a": lambda: None}, rounds=0)
