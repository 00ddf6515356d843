"""Energy model: hand-computed MACs, bytes and picojoules on tiny layers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from prunelab.compress import write_compressed
from prunelab.errors import PrunelabError
from prunelab.measure.counting import measure_model
from prunelab.measure.energy import ASSUMPTIONS, HOROWITZ_45NM, EnergyTable, estimate_energy


def _linear_with_five_nonzeros():
    layer = nn.Linear(4, 3)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask.view(-1)[[0, 3, 5, 8, 11]] = True
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 13.0).reshape(3, 4) * mask)
    return layer, {"weight": mask}


def test_table_is_horowitz_and_frozen():
    t = HOROWITZ_45NM
    assert (t.float_add_pj, t.float_mult_pj, t.int_add_pj, t.int_mult_pj) == (0.9, 3.7, 0.1, 3.1)
    assert (t.register_pj, t.sram_pj, t.dram_pj) == (1.0, 5.0, 640.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.dram_pj = 1.0  # type: ignore[misc]


def test_linear_4x3_with_5_nonzeros_hand_computed(tmp_path):
    layer, masks = _linear_with_five_nonzeros()
    report = write_compressed(tmp_path / "l.plc", layer, masks, bits=2, index_bits=2)
    energy = estimate_energy(layer, torch.randn(1, 4), masks, compressed=report)
    rows = {r.form: r for r in energy.layers}
    assert energy.forms == ("dense", "pruned", "sparse", "compressed")
    # dense: 12 MACs * (3.7 + 0.9); (12 + 3) fp32 words from DRAM; (4 in + 3 out) fp32 words in SRAM
    d = rows["dense"]
    assert (d.macs, d.weight_bytes, d.activation_bytes) == (12, 60, 28)
    assert d.compute_pj == pytest.approx(55.2) and d.weight_pj == pytest.approx(9600.0)
    assert d.activation_pj == pytest.approx(35.0) and d.total_pj == pytest.approx(9690.2)
    # pruned: 5 MACs, 5 weights + 3 biases fetched
    p = rows["pruned"]
    assert (p.macs, p.weight_bytes) == (5, 32)
    assert p.compute_pj == pytest.approx(23.0) and p.weight_pj == pytest.approx(5120.0)
    # sparse: bitmap (20 values + 2 bytes of bits + 12 bias) beats CSR (20 + 20 + 16 + 12)
    s = rows["sparse"]
    assert s.weight_bytes == 34 and s.weight_pj == pytest.approx(34 / 4 * 640)
    # compressed: the file's bytes for this layer; + (1 pJ register + 0.1 pJ int add) per nonzero
    c = rows["compressed"]
    assert c.weight_bytes == report.layers[0].total_bytes
    assert c.compute_pj == pytest.approx(23.0 + 5 * 1.1)
    assert c.weight_pj == pytest.approx(report.layers[0].total_bytes / 4 * 640)
    total = energy.total("dense")
    assert total["total_pj"] == pytest.approx(9690.2)
    summary = {r["form"]: r for r in energy.summary_rows()}
    assert summary["dense"]["energy_saving_x"] == 1.0
    assert summary["pruned"]["energy_nj"] == pytest.approx((23.0 + 5120.0 + 35.0) / 1e3)
    assert energy.assumptions == ASSUMPTIONS and "DRAM" in ASSUMPTIONS


def test_conv_activations_and_custom_table():
    conv = nn.Conv2d(1, 2, 3, bias=False)  # (1, 5, 5) -> (2, 3, 3): 18 weights x 9 positions
    table = EnergyTable(float_add_pj=1.0, float_mult_pj=1.0, dram_pj=4.0, sram_pj=4.0)
    energy = estimate_energy(conv, torch.randn(2, 1, 5, 5), table=table)
    dense = {r.form: r for r in energy.layers}["dense"]
    assert (dense.macs, dense.weight_bytes, dense.activation_bytes) == (162, 72, 4 * (25 + 18))
    assert dense.total_pj == pytest.approx(162 * 2 + 72 / 4 * 4 + 4 * 43 / 4 * 4)
    with pytest.raises(PrunelabError, match="compressed"):
        energy.total("compressed")
    with pytest.raises(PrunelabError, match="EnergyTable"):
        estimate_energy(conv, torch.randn(1, 1, 5, 5), table={"dram_pj": 1})


def test_conv_transpose_is_estimated_by_input_positions():
    # (1, 3, 3) -> (2, 6, 6): weight (1, 2, 2, 2) = 8 applied at 9 input positions = 72 MACs
    layer = nn.ConvTranspose2d(1, 2, 2, stride=2, bias=False)
    table = EnergyTable(float_add_pj=1.0, float_mult_pj=1.0, dram_pj=4.0, sram_pj=4.0)
    dense = {r.form: r for r in estimate_energy(layer, torch.randn(1, 1, 3, 3), table=table).layers}["dense"]
    assert (dense.macs, dense.weight_bytes, dense.activation_bytes) == (72, 32, 4 * (9 + 72))
    assert dense.compute_pj == pytest.approx(144.0) and dense.weight_pj == pytest.approx(32.0)
    assert dense.total_pj == pytest.approx(144.0 + 32.0 + 324.0)


def test_materialised_csr_layer_fetches_its_real_format():
    from prunelab.materialise.sparse_modules import CSRLinear

    layer, masks = _linear_with_five_nonzeros()
    sparse = CSRLinear.from_linear(layer)
    rows = {r.form: r for r in estimate_energy(nn.Sequential(sparse), torch.randn(1, 4)).layers}
    assert set(rows) == {"dense", "pruned", "sparse"}
    assert (rows["dense"].macs, rows["dense"].weight_bytes, rows["dense"].activation_bytes) == (12, 60, 28)
    assert (rows["pruned"].macs, rows["pruned"].weight_bytes) == (5, 32)
    # the CSR it stores: 5 values + 5 int32 columns + 4 int32 row pointers + 3 biases = 68 bytes (not the 34 of a bitmap)
    assert rows["sparse"].weight_bytes == 5 * 4 + 5 * 4 + 4 * 4 + 3 * 4 == sparse.nbytes == 68
    assert rows["sparse"].weight_pj == pytest.approx(68 / 4 * 640)


def test_attention_projections_are_estimated_and_stored_raw_in_the_compressed_file(tmp_path):
    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.att(x, x, x)[0]

    model = SelfAttention()
    report = write_compressed(tmp_path / "a.plc", model, bits=2, index_bits=2)
    energy = estimate_energy(model, torch.randn(1, 3, 4), compressed=report)
    rows = {(r.layer, r.form): r for r in energy.layers}
    assert {layer for layer, _ in rows} == {"att.in_proj.q", "att.in_proj.k", "att.in_proj.v", "att.out_proj"}
    for layer in ("att.in_proj.q", "att.in_proj.k", "att.in_proj.v", "att.out_proj"):
        dense = rows[(layer, "dense")]
        # 16 MACs per token, 3 tokens; (16 + 4) fp32 words; 3 x 4 inputs + 3 x 4 outputs in SRAM
        assert (dense.macs, dense.weight_bytes, dense.activation_bytes) == (48, 80, 4 * 24), layer
    # the file stores in_proj_weight raw (not a Linear/Conv weight): its compressed form reads dense bytes
    raw = rows[("att.in_proj.q", "compressed")]
    assert raw.weight_bytes == 80 and raw.compute_pj == pytest.approx(48 * HOROWITZ_45NM.mac_pj)
    out = rows[("att.out_proj", "compressed")]
    (stored,) = report.layers
    assert stored.name == "att.out_proj.weight" and out.weight_bytes == stored.total_bytes


# --- storage is fetched once per inference; layers the forward never calls fetch nothing -------------------
_UNIT = EnergyTable(float_add_pj=0.5, float_mult_pj=0.5, dram_pj=4.0, sram_pj=4.0)  # 1 pJ per MAC, byte, byte


class _Tied(nn.Module):
    """Two Linear(5, 6) sharing one weight, each with its own bias; ``calls`` says which run."""

    def __init__(self, calls=("first", "second")) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(5, 6), nn.Linear(5, 6)
        self.second.weight = self.first.weight
        self.calls = calls

    def forward(self, x):
        return sum(getattr(self, name)(x) for name in self.calls)


def test_tied_weight_is_fetched_once_but_multiplied_twice(tmp_path):
    model = _Tied()
    report = write_compressed(tmp_path / "t.plc", model, bits=2, index_bits=2)
    energy = estimate_energy(model, torch.randn(1, 5), compressed=report, table=_UNIT)
    rows = {(r.layer, r.form): r for r in energy.layers}
    # first: 30 weights + 6 biases = 144 bytes; second: the weight is already fetched, only its own 6 biases
    assert (rows[("first", "dense")].weight_bytes, rows[("second", "dense")].weight_bytes) == (144, 24)
    assert rows[("first", "dense")].macs == rows[("second", "dense")].macs == 30
    assert energy.total("dense")["weight_bytes"] == 168 == measure_model(model, torch.randn(1, 5)).dense_bytes
    assert energy.total("dense")["total_pj"] == pytest.approx(60 + 168 + 4 * (5 + 6 + 5 + 6))
    assert (rows[("first", "pruned")].weight_bytes, rows[("second", "pruned")].weight_bytes) == (144, 24)
    # sparse: bitmap 120 + 4 + 24 = 148 beats CSR 120 + 120 + 28 + 24; the tied layer reads its bias only
    assert (rows[("first", "sparse")].weight_bytes, rows[("second", "sparse")].weight_bytes) == (148, 24)
    # compressed: the first reads its file entry; the second its bias (no decode: the weight is on chip)
    first, second = report.layers
    assert rows[("first", "compressed")].weight_bytes == first.total_bytes
    assert rows[("second", "compressed")].weight_bytes == second.bias_bytes == 24
    assert rows[("first", "compressed")].compute_pj == pytest.approx(30 + 30 * 1.1)
    assert rows[("second", "compressed")].compute_pj == pytest.approx(30)


def test_module_called_twice_fetches_its_weight_once_and_its_activations_twice():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    (dense,) = [r for r in estimate_energy(Twice(), torch.randn(1, 4), table=_UNIT).layers if r.form == "dense"]
    assert (dense.macs, dense.weight_bytes, dense.activation_bytes) == (32, 80, 4 * 16)
    assert dense.total_pj == pytest.approx(32 + 80 + 64)


def test_layer_never_called_costs_nothing_and_a_tied_layer_that_runs_fetches_the_weight():
    energy = estimate_energy(_Tied(calls=("second",)), torch.randn(1, 5), table=_UNIT)
    rows = {(r.layer, r.form): r for r in energy.layers}
    for form in ("dense", "pruned", "sparse"):
        unused = rows[("first", form)]
        assert (unused.macs, unused.weight_bytes, unused.activation_bytes, unused.total_pj) == (0, 0, 0, 0), form
    assert rows[("second", "dense")].weight_bytes == 144  # the shared weight, fetched by the layer that runs
    assert energy.total("dense")["total_pj"] == pytest.approx(30 + 144 + 4 * 11)


def test_compressed_form_decodes_every_entry_filler_zeros_included(tmp_path):
    layer = nn.Linear(64, 1, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, ::8] = torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0])
    report = write_compressed(tmp_path / "f.plc", layer, bits=2, index_bits=1)
    (stored,) = report.layers
    assert (stored.kept, stored.fillers) == (8, 21)  # 1-bit gaps: each distance of 8 takes 3 fillers
    rows = {r.form: r for r in estimate_energy(layer, torch.randn(1, 64), compressed=report).layers}
    # 8 MACs; 8 + 21 = 29 entries decoded, each one register read (1 pJ) + one int add (0.1 pJ)
    assert rows["compressed"].compute_pj == pytest.approx(8 * 4.6 + 29 * 1.1)
