"""The separable max-pool equals F.max_pool2d exactly; speed_up_pooling_ follows the timer and never picks slower."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from fake_timer import FakeTimer
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.materialise import materialise
from prunelab.materialise.pooling import SeparableMaxPool2d, pool_unavailable_reason, speed_up_pooling_


def _valid(kernel, padding) -> bool:
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    return padding <= kh // 2 and padding <= kw // 2  # what F.max_pool2d accepts


@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    c for c in itertools.product((1, 2, 3, (2, 3)), (1, 2, (1, 2), 3), (0, 1), (1, 2)) if _valid(c[0], c[2])
])
def test_separable_pool_equals_max_pool2d_exactly(kernel, stride, padding, dilation):
    generator = torch.Generator().manual_seed(0)
    for shape in ((2, 3, 9, 11), (3, 7, 8)):  # batched and unbatched, odd sizes that leave a remainder
        x = torch.randn(shape, generator=generator)
        expected = F.max_pool2d(x, kernel, stride, padding, dilation)
        got = SeparableMaxPool2d(kernel, stride, padding, dilation)(x)
        assert got.shape == expected.shape and torch.equal(got, expected)


def test_separable_pool_hand_made_case_with_nan_and_inf():
    x = torch.tensor([[[[1.0, 5.0, -2.0, 0.0],
                        [3.0, -1.0, math.nan, 7.0],
                        [-math.inf, -math.inf, 4.0, 4.0],
                        [-math.inf, -math.inf, 4.0, 2.0]]]])
    got = SeparableMaxPool2d(2)(x)
    expected = torch.tensor([[[[5.0, math.nan], [-math.inf, 4.0]]]])
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(0.0), expected.nan_to_num(0.0))
    assert torch.equal(got.isnan(), F.max_pool2d(x, 2).isnan())  # NaN propagates as in PyTorch's kernel


def test_separable_pool_from_module_and_integer_fallback():
    pool = nn.MaxPool2d(3, stride=2, padding=1)
    separable = SeparableMaxPool2d.from_module(pool)
    assert (separable.kernel_size, separable.stride, separable.padding) == ((3, 3), (2, 2), (1, 1))
    assert SeparableMaxPool2d.from_module(nn.MaxPool2d(2)).stride == (2, 2)  # stride defaults to the kernel
    x = torch.arange(32, dtype=torch.int64).view(1, 2, 4, 4)  # integers: no -inf padding, PyTorch's kernel is used
    assert torch.equal(separable(x), pool(x))


def test_pool_unavailable_reasons():
    assert pool_unavailable_reason(nn.MaxPool2d(2)) is None
    assert "ceil_mode" in pool_unavailable_reason(nn.MaxPool2d(2, ceil_mode=True))
    assert "return_indices" in pool_unavailable_reason(nn.MaxPool2d(2, return_indices=True))
    assert "not nn.MaxPool2d" in pool_unavailable_reason(nn.AvgPool2d(2))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.MaxPool2d(2),                        # 1: pooled 12x12 -> 6x6
        nn.Conv2d(4, 4, 3, padding=1), nn.MaxPool2d(3, 2, 1),       # 3: ResNet-stem style
        nn.MaxPool2d(2, ceil_mode=True),                            # 4: not supported
        nn.Flatten(), nn.Linear(4 * 2 * 2, 3),
    ).eval()


def test_speed_up_pooling_follows_the_timer_and_never_picks_slower():
    model, x = _cnn(), torch.randn(8, 1, 14, 14)
    expected = model(x)
    timer = FakeTimer({
        ("1", "native"): 3.0, ("1", "separable"): 1.0,                                # faster everywhere: swapped
        ("3", "native"): 2.0, ("3", "separable", 1): 3.0, ("3", "separable", 8): 1.0,  # slower at batch 1: kept
    })
    report = speed_up_pooling_(model, {1: x[:1], 8: x}, timer, rounds=3)
    assert report.choices() == {"1": "separable", "3": "native", "4": "native"}
    assert isinstance(model[1], SeparableMaxPool2d) and type(model[3]) is nn.MaxPool2d
    assert "ceil_mode" in report.pools[2].skipped and report.pools[2].seconds == {}
    assert report.pools[0].speedup(8) == 3.0 and report.pools[1].seconds["separable"] == {1: 3.0, 8: 1.0}
    assert timer.calls.count(("1", "separable", 8)) == 3 and not any(c[0] == "4" for c in timer.calls)
    assert [c[1] for c in timer.calls[:2]] == ["native", "separable"]  # interleaved within a round
    assert torch.equal(model(x), expected)
    assert "speedup_b8_x" in report.table() and len(report.rows()) == 3


def test_speed_up_pooling_ties_keep_native_and_bad_inputs_are_refused():
    model = _cnn()
    report = speed_up_pooling_(model, {2: torch.randn(2, 1, 14, 14)}, FakeTimer({}))  # every time 1.0: a tie
    assert set(report.choices().values()) == {"native"}
    with pytest.raises(PrunelabError, match="speed_up_pooling_ needs example inputs keyed by batch size"):
        speed_up_pooling_(model, torch.randn(2, 1, 14, 14))


def test_materialise_pooling_auto_is_checked_and_reported():
    model, x = _cnn(), torch.randn(4, 1, 14, 14)
    timer = FakeTimer({("1", "native"): 2.0, ("1", "separable"): 1.0, ("3", "native"): 2.0, ("3", "separable"): 1.0})
    new = materialise(model, "csr", example_input=x, timer=timer, batch_sizes=(1, 4), pooling="auto")
    assert isinstance(new[1], SeparableMaxPool2d) and isinstance(new[3], SeparableMaxPool2d)
    assert type(model[1]) is nn.MaxPool2d  # the input model is untouched
    assert new.materialise_report.pools.choices()["1"] == "separable"
    assert "max pools (pooling='auto')" in new.materialise_report.table()
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), atol=1e-5, rtol=0)
    plain = materialise(model, "csr", example_input=x)
    assert plain.materialise_report.pools is None and type(plain[1]) is nn.MaxPool2d
    with pytest.raises(PrunelabError, match="unknown pooling 'fast'; valid: native, auto"):
        materialise(model, "csr", example_input=x, pooling="fast")
