"""Model zoo: exact parameter counts, output shapes, stable names, clear errors."""

from __future__ import annotations

import pytest
import torch

from prunelab.bench.models import MODELS, build_model
from prunelab.errors import PrunelabError

MNIST, DIGITS = (1, 28, 28), (1, 8, 8)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "shape", "count"), [
    ("lenet300", MNIST, 266_610),  # Han et al. 2015, Table 2
    ("lenet5", MNIST, 431_080),  # Han et al. 2015, Table 3 (431K)
    ("digits_mlp", DIGITS, 17_226),
    ("lenet300", DIGITS, 50_610),
    ("lenet5", DIGITS, 131_080),  # padding=2: fc1 has 50*2*2 = 200 inputs
])
def test_parameter_counts(name, shape, count):
    assert n_params(build_model(name, shape, 10)) == count


@pytest.mark.parametrize("shape", [MNIST, DIGITS])
@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_maps_a_batch_to_logits(name, shape):
    model = build_model(name, shape, 7)
    assert model(torch.randn(3, *shape)).shape == (3, 7)


def test_parameter_names_are_stable():
    assert list(build_model("lenet300", MNIST, 10).state_dict()) == [
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]
    assert list(build_model("digits_mlp", DIGITS, 10).state_dict()) == [
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]
    lenet5 = build_model("lenet5", MNIST, 10)
    assert list(lenet5.state_dict()) == [
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert (lenet5.padding, lenet5.fc1.in_features) == (0, 800)
    small = build_model("lenet5", DIGITS, 10)
    assert (small.padding, small.fc1.in_features) == (2, 200)


def test_state_dict_round_trips_between_builds():
    torch.manual_seed(0)
    a = build_model("lenet5", MNIST, 10)
    b = build_model("lenet5", MNIST, 10)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, *MNIST)
    assert torch.equal(a(x), b(x))


def test_unknown_model_lists_valid_names():
    with pytest.raises(PrunelabError, match="unknown model 'resnet'; valid names: digits_mlp, lenet300, lenet5"):
        build_model("resnet", MNIST, 10)


@pytest.mark.parametrize(("name", "shape", "classes", "message"), [
    ("lenet5", (784,), 10, "expected 3 dims"),
    ("lenet5", (1, 3, 3), 10, "expected at least 4x4"),
    ("lenet300", (1, 0, 28), 10, "expected positive integers"),
    ("digits_mlp", DIGITS, 1, "expected an integer >= 2"),
])
def test_bad_shapes_are_clear_errors(name, shape, classes, message):
    with pytest.raises(PrunelabError, match=message):
        build_model(name, shape, classes)


def test_row_transformer_rejects_bad_shapes_and_head_counts_clearly():
    from prunelab.bench.row_transformer import RowTransformer, SelfAttention

    assert RowTransformer((1, 8, 8), 10, dim=16, num_heads=4)(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(PrunelabError, match=r"one-channel images .*\(3, 8, 8\)"):
        RowTransformer((3, 8, 8), 10)
    with pytest.raises(PrunelabError, match="one-channel images"):
        RowTransformer((64,), 10)
    for heads in (3, 0):
        with pytest.raises(PrunelabError, match="not a multiple of num_heads"):
            SelfAttention(16, heads)


# --- review fixes -------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [5, None, 1.0])
def test_an_input_shape_that_is_not_a_sequence_is_a_one_line_error(shape):
    for name in ("lenet300", "lenet5", "digits_mlp"):
        with pytest.raises(PrunelabError, match=f"model '{name}' got input_shape {shape!r}; expected a sequence") as exc:
            build_model(name, shape, 10)  # was TypeError: object is not iterable
        assert "\n" not in str(exc.value)


def test_input_shape_may_be_any_sequence_of_ints():
    assert n_params(build_model("lenet5", torch.Size([1, 28, 28]), 10)) == 431_080
    assert n_params(build_model("lenet300", [1, 28, 28], 10)) == 266_610
