"""Review of today's materialise / measure / compress changes (helper a)."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from test_conv1d_support import _Pretrained  # a module-level (picklable) stand-in for a transformers model


def _materialised() -> nn.Module:
    from prunelab.materialise import materialise

    torch.manual_seed(0)
    keep = torch.arange(32).reshape(4, 8) % 3 == 0  # (4, 8): 11 of 32 kept
    return materialise(_Pretrained().eval(), "csr", masks={"fc.weight": keep}, example_input=torch.randn(2, 8))


def test_whole_materialised_transformers_model_pickles_and_keeps_its_routed_save_pretrained():
    # the routed save_pretrained was a bound method of a function named _save_pretrained: torch.save(model)
    # stored getattr(model, "_save_pretrained") and torch.load failed with AttributeError
    new = _materialised()
    buf = io.BytesIO()
    torch.save(new, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), new(x))
    loaded.save_pretrained("folder")
    (saved,) = loaded.saved  # the loaded model's own record, not the original's
    assert new.saved == []
    extra = saved["state"]["fc._extra_state"]
    assert extra.dtype == torch.uint8 and extra.dim() == 1  # still routed: tensor extra state


def test_deepcopy_of_materialised_model_saves_through_the_copy():
    new = _materialised()
    twin = copy.deepcopy(new)
    twin.save_pretrained("twin")
    assert len(twin.saved) == 1 and new.saved == []
    assert twin.saved[0]["state"]["fc._extra_state"].dtype == torch.uint8


def _shared_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    with torch.no_grad():
        shared.weight.copy_(torch.arange(16.0).reshape(4, 4) - 7.5)  # (4, 4), no zeros
        shared.bias.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    keep = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    return nn.Sequential(shared, nn.ReLU(), shared).eval(), keep


def _by_hand(model: nn.Module, keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    w = model[0].weight.detach() * keep  # (4, 4): the masked shared weight
    b = model[0].bias.detach()
    return torch.relu(x @ w.T + b) @ w.T + b


@pytest.mark.parametrize("name", ["0.weight", "2.weight"])
def test_shared_layer_is_swapped_at_every_use_whichever_name_its_mask_has(name):
    # a Linear used twice: the mask under its second name was dropped (layer left dense, with a warning
    # that it "is not a layer materialise swaps"); under its first name only the first use became sparse
    from prunelab.materialise import materialise

    model, keep = _shared_model()
    x = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, -1.0, 2.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left dense
        new = materialise(model, "csr", masks={name: keep}, example_input=x)
    assert type(new[0]).__name__ == "CSRLinear" and new[2] is new[0]  # one module: the tie holds
    assert [f.name for f in new.materialise_report.layers] == ["0"]
    assert new[0].nbytes == 4 * 6 + 4 * 6 + 4 * 5 + 4 * 4  # 6 kept values + 6 col indices + 5 row ptrs + bias
    assert torch.allclose(new(x), _by_hand(model, keep, x), atol=1e-6)
