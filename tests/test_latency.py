"""interleaved_latency: side-by-side medians, and the sync hook GPU timing needs."""

from __future__ import annotations

import time

import pytest

from prunelab.measure.latency import interleaved_latency


def test_sync_runs_before_every_clock_read():
    calls = []
    variants = {"a": lambda: None, "b": lambda: None}
    interleaved_latency(variants, reps=3, warmup=1, sync=lambda: calls.append(1))
    # per variant: 2 reads while sizing the inner loop, then 2 per repetition
    assert len(calls) == 2 * len(variants) + 2 * 3 * len(variants)


def test_a_slower_variant_measures_slower():
    seconds = interleaved_latency({"sleep": lambda: time.sleep(0.002), "noop": lambda: None}, reps=3,
                                  min_sample_s=1e-3, warmup=0)
    assert set(seconds) == {"sleep", "noop"}
    assert seconds["sleep"] >= 0.002 > seconds["noop"]


def test_reps_must_be_positive():
    with pytest.raises(ValueError, match="reps must be >= 1"):
        interleaved_latency({"a": lambda: None}, reps=0)
