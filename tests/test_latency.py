"""interleaved_latency: side-by-side medians, the sync hook GPU timing needs; per-leaf latency."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.measure.latency import interleaved_latency, layer_latency_ms, model_latency_ms


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


def test_layer_latency_times_each_leaf_of_every_model_on_its_own_inputs():
    class Shared(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.fc = nn.Linear(4, width)
            self.act = nn.ReLU()
            self.out = nn.Linear(width, 4)

        def forward(self, x):
            return self.act(self.out(self.act(self.fc(x))))  # act is called twice: skipped

    seen = []
    wide, narrow = Shared(64), Shared(8)
    narrow.out.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    layers = layer_latency_ms({"wide": wide, "narrow": narrow}, torch.randn(3, 4), reps=3)
    assert list(layers) == ["fc", "out"]  # call order, the twice-called ReLU left out
    assert all(set(times) == {"wide", "narrow"} and all(t > 0 for t in times.values()) for times in layers.values())
    assert all(shape == (3, 8) for shape in seen)  # narrow.out was timed on narrow's own (3, 8) inputs
    assert not wide._forward_pre_hooks and not wide.fc._forward_pre_hooks  # hooks removed


@pytest.mark.parametrize("kwargs", [{"reps": 0}, {"reps": 1.5}, {"reps": True}, {"warmup": -1}])
def test_bad_repetition_counts_are_prunelab_errors(kwargs):
    with pytest.raises(PrunelabError, match="reps|warmup"):
        interleaved_latency({"a": lambda: None}, **kwargs)


class _RecordsMode(nn.Module):
    """Remembers whether each forward ran in training mode; its dropout child starts in eval mode."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)
        self.fail = fail
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.training, self.drop.training))
        if self.fail:
            raise RuntimeError("boom")
        return self.drop(self.fc(x))


def _train_with_eval_child(model: _RecordsMode) -> _RecordsMode:
    model.train()
    model.drop.eval()
    return model


@pytest.mark.parametrize("timer", ["model", "layer"])
def test_latency_runs_models_in_eval_mode_and_restores_their_modes(timer):
    a, b = _train_with_eval_child(_RecordsMode()), _RecordsMode().eval()
    if timer == "model":
        model_latency_ms({"a": a, "b": b}, torch.randn(2, 4), reps=1)
    else:
        layer_latency_ms({"a": a, "b": b}, torch.randn(2, 4), reps=1)
    assert a.seen and set(a.seen) == {(False, False)} and set(b.seen) == {(False, False)}
    assert a.training and a.fc.training and not a.drop.training  # as they came in
    assert not b.training and not b.fc.training


def test_model_latency_restores_modes_when_a_forward_raises():
    model = _train_with_eval_child(_RecordsMode(fail=True))
    with pytest.raises(RuntimeError, match="boom"):
        model_latency_ms({"broken": model}, torch.randn(2, 4), reps=1)
    assert model.training and model.fc.training and not model.drop.training
