"""Exact, hand-computed checks of prunelab.measure (counting + tables)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.measure import (
    LayerCost, ModelCost, format_bytes, format_float, markdown_table, measure_model, model_cost_table,
)


def _tiny_mlp() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)  # every value nonzero, so only the mask decides
    return model


def _mask_5_of_12() -> torch.Tensor:
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask.view(-1)[torch.tensor([0, 3, 5, 6, 11])] = True
    return mask


def _all_hooks_removed(model: nn.Module) -> bool:
    hooks = all(not m._forward_hooks and not m._forward_pre_hooks and not m._forward_hooks_always_called
                for m in model.modules())
    return hooks and not torch.overrides.has_torch_function((torch.zeros(1),))  # no TorchFunctionMode left


def test_tiny_mlp_with_mask_exact_counts():
    model = _tiny_mlp()
    cost = measure_model(model, torch.randn(1, 4), {"0.weight": _mask_5_of_12()})
    first, second = cost.layers
    assert [l.name for l in cost.layers] == ["0", "2"]
    assert first.kind == "Linear" and first.weight_shape == (3, 4) and first.reached

    # layer 0: 12 weights (5 kept) + 3 bias
    assert (first.params, first.weight_params, first.weight_nonzeros, first.nonzeros) == (15, 12, 5, 8)
    assert first.output_positions == 1
    assert (first.dense_macs, first.sparse_macs, first.dense_flops, first.sparse_flops) == (12, 5, 24, 10)
    assert first.dense_bytes == 60
    assert first.csr_bytes == 5 * 4 + 5 * 4 + (3 + 1) * 4 + 3 * 4 == 68
    assert first.bitmap_bytes == 5 * 4 + 2 + 3 * 4 == 34
    assert first.best_sparse_bytes == 34
    assert first.sparsity == pytest.approx(7 / 12)

    # layer 2: dense 2x3 + 2 bias
    assert (second.params, second.nonzeros, second.dense_macs, second.sparse_macs) == (8, 8, 6, 6)
    assert second.csr_bytes == 6 * 8 + 3 * 4 + 2 * 4 == 68
    assert second.bitmap_bytes == 6 * 4 + 1 + 2 * 4 == 33

    assert cost.other_params == 0
    assert (cost.params, cost.nonzeros) == (23, 16)
    assert (cost.dense_macs, cost.sparse_macs, cost.dense_flops, cost.sparse_flops) == (18, 11, 36, 22)
    assert (cost.dense_bytes, cost.csr_bytes, cost.bitmap_bytes, cost.best_sparse_bytes) == (92, 136, 67, 67)
    assert cost.sparsity == pytest.approx(1 - 11 / 18)
    assert cost.compression_x == pytest.approx(23 / 16)
    assert cost.storage_ratio_x == pytest.approx(92 / 67)


def test_masks_and_real_zeros_are_intersected():
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 4.0]]))
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    x = torch.randn(1, 4)
    assert measure_model(layer, x).layers[0].weight_nonzeros == 4  # no mask: real nonzeros
    assert measure_model(layer, x, {"weight": torch.ones(2, 4, dtype=torch.bool)}).layers[0].weight_nonzeros == 4
    # kept & nonzero: (0,0) and (1,1), (1,3); (0,2) is nonzero but pruned, (0,1)/(1,0)/(1,2) are kept but zero
    masked = measure_model(layer, x, {"weight": mask}).layers[0]
    assert masked.name == "" and masked.weight_nonzeros == 3 and masked.sparse_macs == 3 and masked.bias_params == 0


def test_conv_same_padding_positions_and_macs():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1))
    cost = measure_model(model, torch.randn(1, 2, 5, 5))
    conv = cost.layers[0]
    assert conv.kind == "Conv2d" and conv.weight_shape == (4, 2, 3, 3)
    assert conv.output_positions == 25
    assert conv.dense_macs == 2 * 4 * 9 * 25 == 1800
    assert conv.params == 72 + 4
    # CSR views the weight as a (4, 18) matrix
    assert conv.csr_bytes == 72 * 8 + 5 * 4 + 4 * 4


def test_grouped_strided_dilated_and_1d_convs():
    grouped = measure_model(nn.Conv2d(4, 6, 3, groups=2, padding=1), torch.randn(1, 4, 6, 6)).layers[0]
    assert grouped.weight_shape == (6, 2, 3, 3)
    assert grouped.output_positions == 36
    assert grouped.dense_macs == 6 * (4 // 2) * 9 * 36 == 3888

    strided = measure_model(nn.Conv2d(3, 8, 3, stride=2), torch.randn(1, 3, 7, 7)).layers[0]
    assert strided.output_positions == 9  # floor((7 - 3) / 2) + 1 = 3 per side
    assert strided.dense_macs == 8 * 3 * 9 * 9 == 1944

    dilated = measure_model(nn.Conv2d(1, 1, 3, dilation=2), torch.randn(1, 1, 9, 9)).layers[0]
    assert dilated.output_positions == 25  # 9 - 2 * (3 - 1) = 5 per side

    conv1d = measure_model(nn.Conv1d(2, 3, 3), torch.randn(1, 2, 10)).layers[0]
    assert conv1d.kind == "Conv1d" and conv1d.output_positions == 8 and conv1d.dense_macs == 3 * 2 * 3 * 8


def test_costs_are_per_sample_and_linear_on_sequences_counts_tokens():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1))
    assert measure_model(model, torch.randn(4, 2, 5, 5)).dense_macs == 1800

    seq = measure_model(nn.Linear(4, 3), torch.randn(2, 5, 4)).layers[0]  # (B, T, C) = (2, 5, 4)
    assert seq.output_positions == 5
    assert seq.dense_macs == 3 * 4 * 5


def test_lenet_300_100_dense_macs():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                          nn.Linear(100, 10))
    cost = measure_model(model, torch.randn(1, 1, 28, 28))
    assert cost.dense_macs == 784 * 300 + 300 * 100 + 100 * 10 == 266200
    assert cost.dense_flops == 532400
    assert cost.params == 266200 + 300 + 100 + 10 == 266610
    # random init almost never holds an exact zero, but the global RNG state depends on the tests run before
    zeros = sum(int((m.weight == 0).sum()) for m in model if isinstance(m, nn.Linear))
    assert cost.sparsity == pytest.approx(zeros / 266200, abs=1e-12)


def test_hooks_removed_and_modes_restored_when_forward_raises():
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.drop = nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.fc(x)
            raise RuntimeError("boom")

    model = Broken()
    model.train()
    model.drop.eval()
    with pytest.raises(RuntimeError, match="boom"):
        measure_model(model, torch.randn(1, 4))
    assert _all_hooks_removed(model)
    assert model.training and model.fc.training and not model.drop.training


def test_hooks_removed_modes_restored_and_eval_used_on_success():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    model.train()
    cost = measure_model(model, torch.randn(1, 4))  # BatchNorm1d in train mode would reject a batch of 1
    assert _all_hooks_removed(model)
    assert all(m.training for m in model.modules())
    assert cost.other_params == 6  # BatchNorm weight + bias, counted dense
    assert cost.params == 15 + 6 + 8 and cost.nonzeros == cost.params
    assert cost.dense_bytes == 4 * cost.params


def test_unreached_layer_is_listed_with_zero_macs():
    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 3)
            self.unused = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    cost = measure_model(Partial(), torch.randn(1, 4))
    used, unused = cost.layers
    assert used.reached and used.dense_macs == 12
    assert not unused.reached and unused.output_positions == 0 and unused.dense_macs == 0
    assert unused.params == 8 and cost.params == 23
    assert "unused (not run)" in model_cost_table(cost)


def test_shared_module_called_twice_adds_positions():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.fc(x))

    cost = measure_model(Twice(), torch.randn(1, 3))
    assert cost.layers[0].output_positions == 2 and cost.dense_macs == 18 and cost.params == 12


def test_bad_masks_and_inputs_raise_prunelab_error():
    model = _tiny_mlp()
    x = torch.randn(1, 4)
    with pytest.raises(PrunelabError, match="names no parameter"):
        measure_model(model, x, {"fc1.weight": torch.ones(3, 4, dtype=torch.bool)})
    with pytest.raises(PrunelabError, match=r"shape \(4, 3\).*\(3, 4\)"):
        measure_model(model, x, {"0.weight": torch.ones(4, 3, dtype=torch.bool)})
    with pytest.raises(PrunelabError, match="Linear/Conv weights only"):
        measure_model(model, x, {"0.bias": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(PrunelabError, match="leading batch dimension"):
        measure_model(model, [x])  # type: ignore[arg-type]
    with pytest.raises(PrunelabError, match="batch size 0"):
        measure_model(model, torch.randn(0, 4))
    assert _all_hooks_removed(model)


def test_to_dict_is_flat_json_with_units():
    cost = measure_model(_tiny_mlp(), torch.randn(1, 4), {"0.weight": _mask_5_of_12()})
    record = json.loads(json.dumps(cost.to_dict()))
    assert record["params"] == 23 and record["nonzeros"] == 16
    assert record["dense_macs"] == 18 and record["sparse_flops"] == 22
    assert record["size_dense_bytes"] == 92 and record["size_csr_bytes"] == 136
    assert record["size_bitmap_bytes"] == 67 and record["size_best_sparse_bytes"] == 67
    assert record["sparsity"] == pytest.approx(7 / 18)
    assert record["compression_x"] == pytest.approx(23 / 16)
    assert [l["name"] for l in record["layers"]] == ["0", "2"]
    assert record["layers"][0]["weight_shape"] == [3, 4] and record["layers"][0]["size_csr_bytes"] == 68


def test_cost_dataclasses_are_frozen_and_empty_model_cost_is_safe():
    layer = LayerCost("fc", "Linear", (2, 2), 4, 0, 0, 1)
    with pytest.raises(AttributeError):
        layer.weight_nonzeros = 3  # type: ignore[misc]
    empty = ModelCost(layers=())
    assert empty.sparsity == 0.0 and empty.params == 0 and math.isinf(empty.compression_x)


def test_format_bytes_uses_powers_of_1000():
    assert format_bytes(0) == "0 B"
    assert format_bytes(999) == "999 B"
    assert format_bytes(1024) == "1.02 KB"
    assert format_bytes(1_020_000) == "1.02 MB"
    assert format_bytes(999_999) == "1.00 MB"
    assert format_bytes(3 * 10**9) == "3.00 GB"
    # a size that rounds up to 1000 of a unit is written in the next unit
    assert format_bytes(999.94) == "999.9 B" and format_bytes(999.96) == "1.00 KB"
    assert format_bytes(999_994) == "999.99 KB" and format_bytes(999_996) == "1.00 MB"
    with pytest.raises(PrunelabError, match=">= 0"):
        format_bytes(-1)


def test_markdown_table_exact_two_rows():
    rows = [{"model": "dense", "params": 266610, "error_pct": 1.6, "met": True},
            {"model": "pruned|92%", "params": 21329, "error_pct": 0.01234, "met": False}]
    columns = [("model", "model"), ("params", "params"), ("error_pct", "error %"), ("met", "met")]
    expected = (
        "| model       |  params | error % | met   |\n"
        "| ----------- | ------: | ------: | ----- |\n"
        "| dense       | 266,610 |    1.60 | True  |\n"
        "| pruned\\|92% |  21,329 | 0.01234 | False |"
    )
    assert markdown_table(rows, columns) == expected


def test_markdown_table_defaults_missing_cells_and_formats():
    rows = [{"a": "x", "b": 1.23456}, {"a": "y", "c": 1234567}]
    assert markdown_table(rows) == (
        "| a   |    b |         c |\n"
        "| --- | ---: | --------: |\n"
        "| x   | 1.23 |           |\n"
        "| y   |      | 1,234,567 |"
    )
    assert markdown_table(rows, [("b", "b")], floatfmt=".3f").splitlines()[2] == "| 1.235 |"
    assert markdown_table(rows, [("c", "c")], thousands=False).splitlines()[3] == "| 1234567 |"
    assert markdown_table([], [("a", "A")]) == "| A   |\n| --- |"
    with pytest.raises(PrunelabError, match="no rows and no columns"):
        markdown_table([])
    with pytest.raises(PrunelabError, match=r"\(key, title\) pairs"):
        markdown_table(rows, ["a"])  # type: ignore[list-item]


def test_model_cost_table_rows_and_total():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    cost = measure_model(model, torch.randn(1, 4), {"0.weight": _mask_5_of_12()})
    lines = model_cost_table(cost).splitlines()
    assert len(lines) == 2 + 2 + 1 + 1  # header, rule, 2 layers, other params, total
    assert "weight sparsity %" in lines[0] and "CSR KB" in lines[0] and "bitmap KB" in lines[0]
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:5] == ["0", "3x4", "15", "8", "58.33"]
    assert cells[7:] == ["0.06", "0.068", "0.034"]
    assert lines[4].startswith("| other params (dense)")
    total = [c.strip() for c in lines[5].strip("|").split("|")]
    assert total[0] == "total" and total[2] == "29" and total[3] == "22"
    with pytest.raises(PrunelabError, match="needs a ModelCost"):
        model_cost_table({"params": 1})  # type: ignore[arg-type]


def test_tied_weights_are_stored_once_but_computed_twice():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = nn.Linear(5, 6), nn.Linear(5, 6)
            self.second.weight = self.first.weight  # tied weight, each layer keeps its own bias

        def forward(self, x):
            return self.first(x) + self.second(x)

    model = Tied()
    cost = measure_model(model, torch.randn(2, 5))
    assert cost.params == sum(p.numel() for p in model.parameters()) == 30 + 6 + 6
    assert [layer.shares_storage for layer in cost.layers] == [False, True]
    assert [(layer.tied_to, layer.bias_tied_to) for layer in cost.layers] == [(None, None), ("first", None)]
    assert cost.dense_macs == 2 * 30  # both layers multiply
    assert cost.dense_bytes == 4 * 42 and cost.weight_params == 30


def test_mask_of_a_tied_weight_applies_under_either_name():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = nn.Linear(4, 3, bias=False), nn.Linear(4, 3, bias=False)
            self.second.weight = self.first.weight
            nn.init.ones_(self.first.weight)  # every value nonzero: only the mask prunes

        def forward(self, x):
            return self.first(x) + self.second(x)

    for key in ("first.weight", "second.weight"):
        cost = measure_model(Tied(), torch.randn(1, 4), {key: _mask_5_of_12()})
        assert [l.weight_nonzeros for l in cost.layers] == [5, 5], key
        assert cost.sparse_macs == 2 * 5 and cost.weight_nonzeros == 5 and cost.weight_params == 12


def test_layer_with_zero_outputs_counts_without_crashing():
    class WithEmpty(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.full, self.empty = nn.Linear(4, 3), nn.Linear(4, 0)

        def forward(self, x):
            return torch.cat([self.full(x), self.empty(x)], dim=-1)

    with pytest.warns(UserWarning, match="zero-element"):  # torch's init of the empty weight
        model = WithEmpty()
    cost = measure_model(model, torch.randn(2, 5, 4))  # (B, T, C): 5 positions per sample
    full, empty = cost.layers
    assert (full.output_positions, full.dense_macs) == (5, 60)
    assert (empty.output_positions, empty.dense_macs, empty.params, empty.csr_bytes) == (5, 0, 0, 4)
    assert cost.dense_macs == 60 and cost.params == 15 and cost.sparsity == 0.0


def test_conv_transpose_macs_are_weight_times_input_positions():
    # ConvTranspose2d(4, 2, 3, stride=2): weight (in=4, out=2, 3, 3) = 72; every one of the
    # 5 x 5 input positions multiplies the whole weight: 72 * 25 = 1800 MACs (output is 11 x 11)
    model = nn.Sequential(nn.ConvTranspose2d(4, 2, 3, stride=2))
    cost = measure_model(model, torch.randn(2, 4, 5, 5))
    (layer,) = cost.layers
    assert layer.kind == "ConvTranspose2d" and layer.weight_shape == (4, 2, 3, 3)
    assert layer.output_positions == 25 and layer.dense_macs == 4 * 2 * 9 * 25 == 1800
    assert cost.other_params == 0 and cost.params == 72 + 2
    # grouped: weight (4, 6 / 2, 3, 3) = 108 per input position, 7 x 7 positions
    grouped = measure_model(nn.ConvTranspose2d(4, 6, 3, groups=2, padding=1), torch.randn(1, 4, 7, 7)).layers[0]
    assert grouped.weight_shape == (4, 3, 3, 3) and grouped.dense_macs == 108 * 49 == 5292
    conv1d = measure_model(nn.ConvTranspose1d(3, 2, 4, stride=2), torch.randn(1, 3, 6)).layers[0]
    assert conv1d.output_positions == 6 and conv1d.dense_macs == 3 * 2 * 4 * 6


def test_mask_on_conv_transpose_weight_counts_sparse_macs():
    model = nn.Sequential(nn.ConvTranspose2d(2, 1, 2, bias=False))
    nn.init.ones_(model[0].weight)
    mask = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
    mask[0, 0, 0, 0] = mask[1, 0, 1, 1] = True
    layer = measure_model(model, torch.randn(1, 2, 3, 3), {"0.weight": mask}).layers[0]
    assert (layer.weight_params, layer.weight_nonzeros) == (8, 2)
    assert (layer.dense_macs, layer.sparse_macs) == (8 * 9, 2 * 9)
    # CSR of the (in, out * k * k) = (2, 4) view: 2 values + 2 column indices + 3 row pointers
    assert layer.csr_bytes == 2 * 4 + 2 * 4 + 3 * 4


def _half_zero_linear() -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    with torch.no_grad():
        layer.weight[:, ::2] = 0.0  # 16 of 32 weights zero, every 2:4 group has 2 nonzeros
        layer.weight[:, 1::2] = torch.rand(4, 4) + 0.5
    return layer


def test_materialised_sparse_modules_are_counted():
    from prunelab.materialise.sparse_modules import BSRLinear, CSRLinear, SemiStructuredLinear

    x = torch.randn(1, 3, 8)  # (B, T, C): 3 positions per sample
    dense = measure_model(nn.Sequential(_half_zero_linear()), x).layers[0]
    # hand count: 32 weights, 16 nonzero, 4 bias; 3 positions
    expected_bytes = {
        CSRLinear: 16 * 4 + 16 * 4 + (4 + 1) * 4 + 4 * 4,       # values + int32 cols + int32 row pointers + bias = 164
        BSRLinear: 2 * 16 * 4 + 2 * 4 + (1 + 1) * 4 + 4 * 4,    # two 4x4 blocks, 2 block cols, 2 row ptrs, bias = 160
        SemiStructuredLinear: 16 * 4 + 4 * 1 * 2 + 4 * 4,       # 2 of 4 values + 16-bit metadata per 16 cols + bias = 88
    }
    for cls, nbytes in expected_bytes.items():
        module = cls.from_linear(_half_zero_linear())
        cost = measure_model(nn.Sequential(module), x)
        (layer,) = cost.layers
        assert layer.kind == cls.__name__ and layer.weight_shape == (4, 8), cls
        assert (layer.weight_params, layer.weight_nonzeros, layer.bias_params) == (32, 16, 4), cls
        assert (layer.output_positions, layer.dense_macs, layer.sparse_macs) == (3, 96, 48), cls
        assert layer.format_bytes == nbytes == module.nbytes, cls
        assert (cost.params, cost.nonzeros) == (36, 20), cls
        assert cost.stored_bytes == nbytes and cost.dense_bytes == dense.dense_bytes == 144, cls
        assert cost.sparse_macs == dense.sparse_macs and cost.to_dict()["size_stored_bytes"] == nbytes, cls
    # a mask under the dense layer's weight name still applies
    masked = measure_model(nn.Sequential(CSRLinear.from_linear(_half_zero_linear())), x,
                           {"0.weight": torch.zeros(4, 8, dtype=torch.bool)}).layers[0]
    assert masked.weight_nonzeros == 0 and masked.sparse_macs == 0


def test_materialised_csr_conv_is_counted():
    from prunelab.materialise.sparse_modules import CSRConv2d

    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
    with torch.no_grad():
        conv.weight[1:] = 0.0  # only output channel 0 keeps its 18 weights
    sparse = CSRConv2d.from_conv(conv)
    cost = measure_model(nn.Sequential(sparse), torch.randn(1, 2, 6, 6))
    (layer,) = cost.layers
    assert layer.kind == "CSRConv2d" and layer.output_positions == 9  # 3 x 3 output
    assert (layer.dense_macs, layer.sparse_macs) == (54 * 9, 18 * 9)
    assert layer.format_bytes == 18 * 4 + 18 * 4 + 4 * 4 + 3 * 4 == sparse.nbytes
    # a dense model's stored bytes are its dense bytes
    plain = measure_model(nn.Sequential(conv), torch.randn(1, 2, 6, 6))
    assert plain.stored_bytes == plain.dense_bytes and plain.layers[0].format_bytes is None
    assert "size_stored_bytes" not in plain.to_dict() and "size_format_bytes" not in plain.to_dict()["layers"][0]


def test_model_cost_table_marks_tied_layers_left_out_of_the_total():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = nn.Linear(5, 6, bias=False), nn.Linear(5, 6, bias=False)
            self.second.weight = self.first.weight

        def forward(self, x):
            return self.first(x) + self.second(x)

    lines = model_cost_table(measure_model(Tied(), torch.randn(1, 5))).splitlines()
    names = [line.strip("|").split("|")[0].strip() for line in lines[2:]]
    # the total's 30 params store the tied weight once; the second row must say why it is not added
    assert names == ["first", "second (tied: stored with an earlier layer)", "total"]
    assert [c.strip() for c in lines[4].strip("|").split("|")][2] == "30"


def test_format_float_picks_the_format_by_the_printed_size():
    assert format_float(999.996) == "1,000" and format_float(-999.996) == "-1,000"  # not "1000.00"
    assert format_float(999.994) == "999.99" and format_float(1234.4) == "1,234"
    assert format_float(0.99996) == "1.00" and format_float(0.99994) == "0.9999"  # not "1"
    assert format_float(1.5) == "1.50" and format_float(0.0001234) == "0.0001234" and format_float(0.0) == "0"
    assert format_float(float("nan")) == "nan" and format_float(2.0, ".3f") == "2.000"


def test_public_names_stay_importable_from_their_old_modules():
    from prunelab.measure import costs, counting, tables

    assert counting.LayerCost is costs.LayerCost and counting.ModelCost is costs.ModelCost
    assert counting.BYTES_PER_VALUE == costs.BYTES_PER_VALUE == 4 and counting.BYTES_PER_INDEX == 4
    assert counting.format_bytes is tables.format_bytes is format_bytes
    assert callable(counting.measured_layers) and counting.MEASURED_TYPES and counting.TRANSPOSED_TYPES
