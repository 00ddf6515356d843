"""input_norm_spread: max_j ||X_j|| / median_j ||X_j|| per Linear, hooks always removed."""

import math

import pytest
import torch
from torch import nn

from prunelab.oneshot.diagnostics import input_norm_spread, spread_summary
from conv1d_stand_in import Conv1D, register


def test_spread_equals_hand_computation_over_batches():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
        model[0].bias.zero_()
    batches = [torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[1.0, 2.0, 4.0]])]  # column norms sqrt2, sqrt8, 4
    spread = input_norm_spread(model, batches)
    assert spread["0"] == pytest.approx(4.0 / math.sqrt(8.0))
    # layer 1 sees [1, 0] and [1, 4]: norms sqrt2 and 4, median (lower middle) sqrt2
    assert spread["1"] == pytest.approx(4.0 / math.sqrt(2.0))
    assert spread_summary(spread)["max_over_layers"] == pytest.approx(4.0 / math.sqrt(2.0))


def test_hooks_are_removed_even_when_the_forward_fails():
    from prunelab.errors import PrunelabError

    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(PrunelabError, match=r"calibration item 1 \(Tensor of shape \(1, 5\)\) fails") as info:
        input_norm_spread(model, [torch.ones(1, 3), torch.ones(1, 5)])
    assert "\n" not in str(info.value)
    assert not model[0]._forward_pre_hooks
    assert model.training  # train/eval flag restored
    for calibration, text in [([], "empty"), ([torch.ones(0, 3)], "empty Tensor"), (["text"], "item 0 is a str")]:
        with pytest.raises(PrunelabError, match=text):
            input_norm_spread(model, calibration)


def test_mapping_batches_such_as_a_tokenizer_output_are_passed_as_keywords():
    from collections import UserDict  # transformers' BatchEncoding is a UserDict, not a dict

    class Keywords(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, features):
            return self.fc(features)

    spread = input_norm_spread(Keywords(), [UserDict({"features": torch.ones(4, 3)})])
    assert list(spread) == ["fc"]


def test_spread_summary_of_nothing_is_a_one_line_error():
    from prunelab.errors import PrunelabError

    with pytest.raises(PrunelabError, match="spread_summary got no layers"):
        spread_summary({})


def test_padding_positions_are_left_out():
    class Padded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 1)

        def forward(self, features, attention_mask):
            return self.fc(features)

    features = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [1000.0, 0.0]]])  # (1, 3, 2): position 2 is padding
    mask = torch.tensor([[1, 1, 0]])
    spread = input_norm_spread(Padded(), [{"features": features, "attention_mask": mask}])
    # real rows [1, 2], [3, 4]: norms sqrt10, sqrt20; median (lower middle) sqrt10
    assert spread["fc"] == pytest.approx(math.sqrt(2.0))


def _conv1d_then_linear(conv1d: type) -> nn.Module:
    model = nn.Sequential(conv1d(2, 3), nn.Linear(2, 1))  # Conv1D(nf=out, nx=in)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).T)  # (in 3, out 2)
        model[0].bias.zero_()
    return model


def test_gpt2_style_conv1d_inputs_are_measured_along_their_in_features(monkeypatch):
    import sys

    batches = [torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[1.0, 2.0, 4.0]])]  # column norms sqrt2, sqrt8, 4
    # found by type as transformers.pytorch_utils.Conv1D, as the engine finds it (transformers never imported)
    register(monkeypatch)
    spread = input_norm_spread(_conv1d_then_linear(Conv1D), batches)
    assert spread == pytest.approx({"0": 4.0 / math.sqrt(8.0), "1": 4.0 / math.sqrt(2.0)})
    monkeypatch.delitem(sys.modules, "transformers.pytorch_utils")  # an unrelated module of that shape: not a layer
    assert list(input_norm_spread(_conv1d_then_linear(Conv1D), batches)) == ["1"]


def test_transformers_conv1d_is_measured():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    batches = [torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[1.0, 2.0, 4.0]])]
    spread = input_norm_spread(_conv1d_then_linear(pytorch_utils.Conv1D), batches)
    assert spread == pytest.approx({"0": 4.0 / math.sqrt(8.0), "1": 4.0 / math.sqrt(2.0)})
