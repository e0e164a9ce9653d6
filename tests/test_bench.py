"""make bench's ratios: paired per-round medians with a spread, and rounds added until it is small."""

from __future__ import annotations

import itertools

import pytest

from kacli.bench.amalgamate_bench import TARGET_SPREAD, paired_ratio, time_variants


def test_paired_ratio_median_and_spread():
    a = [1.10, 1.20, 1.05, 1.15, 1.30]
    b = [1.00, 1.00, 1.00, 1.00, 1.00]
    med, spread = paired_ratio(a, b)
    assert med == pytest.approx(1.15)
    # MAD of [1.10, 1.20, 1.05, 1.15, 1.30] around 1.15 is 0.05
    assert spread == pytest.approx(1.96 * 1.858 * 0.05 / 5**0.5 / 1.15)
    assert paired_ratio([2.0, 2.0], [1.0, 1.0])[1] == float("inf")


class Fake:
    """A variant whose step takes ``base`` seconds times a repeating noise pattern."""

    def __init__(self, name, base, noise):
        self.name, self.base, self.noise = name, base, itertools.cycle(noise)

    def step(self, clock):
        t = self.base * next(self.noise)
        return {"data": 0.0, "forward": t / 2, "backward": t / 2, "total": t}


def test_rounds_are_added_until_the_ratio_spread_is_met():
    quiet = [Fake("raw", 1.0, [1.0]), Fake("ka", 1.1, [1.0])]
    t = time_variants(quiet, rounds=3, steps=1, warmup=0, clock=lambda: 0.0, pairs=(("ka", "raw"),), max_rounds=50)
    assert len(t["ka"]["rounds"]) == 3  # no noise: the minimum
    noisy = [Fake("raw", 1.0, [1.0]), Fake("ka", 1.1, [0.97, 1.03, 1.0, 1.015, 0.985])]
    t = time_variants(noisy, rounds=3, steps=1, warmup=0, clock=lambda: 0.0, pairs=(("ka", "raw"),), max_rounds=50)
    n = len(t["ka"]["rounds"])
    assert 3 < n < 50
    assert paired_ratio(t["ka"]["rounds"], t["raw"]["rounds"])[1] <= TARGET_SPREAD
    assert paired_ratio(t["ka"]["rounds"][:-1], t["raw"]["rounds"][:-1])[1] > TARGET_SPREAD  # stopped at once
    t = time_variants(noisy, rounds=3, steps=1, warmup=0, clock=lambda: 0.0, pairs=(("ka", "raw"),), max_rounds=6)
    assert len(t["ka"]["rounds"]) == 6  # the cap
