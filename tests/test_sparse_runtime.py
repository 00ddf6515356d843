"""Sparse modules, kernel autotuning (with a fake timer) and materialise() -- behaviour, no timing."""

from __future__ import annotations

import copy
import io
import sys
import types
import warnings

import pytest
import torch
from fake_timer import FakeTimer
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.masks import MaskSet
from prunelab.materialise import FORMS, materialise
from prunelab.materialise.autotune import choose_kernels, median_timer
from prunelab.materialise.sparse_modules import (
    BSRLinear, CSRConv2d, CSRLinear, SemiStructuredLinear, build_sparse, load_materialised,
)
from prunelab.structure import NM

pytestmark = pytest.mark.filterwarnings("ignore:Sparse (CSR|BSR) tensor support is in beta")


def _prune_(module: nn.Module, sparsity: float, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight[torch.rand(module.weight.shape, generator=g) < sparsity] = 0
    return module


def _prune_24_(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        module.weight.mul_(NM(2, 4).pattern_mask(module.weight.abs()))
    return module


def _block_prune_(linear: nn.Linear, block=(4, 4), keep_every=3) -> nn.Linear:
    """Zero all but every ``keep_every``-th block, so BSR stores no extra zeros."""
    bh, bw = block
    rows, cols = linear.weight.shape
    keep = torch.zeros(rows // bh, cols // bw, dtype=torch.bool)
    keep.view(-1)[::keep_every] = True
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    with torch.no_grad():
        linear.weight.mul_(mask)
    return linear


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 8))
    for layer in model:
        if isinstance(layer, nn.Linear):
            _prune_(layer, 0.8)
    return model.eval()


# --- sparse modules ---------------------------------------------------------------------

INPUT_SHAPES = [(1, 32), (7, 32), (3, 5, 32), (2, 2, 2, 32)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", INPUT_SHAPES)
@pytest.mark.parametrize("kernel", ["csr", "bsr", "2:4"])
def test_sparse_linear_equals_dense(kernel, shape, bias):
    torch.manual_seed(0)
    linear = nn.Linear(32, 24, bias=bias)
    _prune_24_(linear) if kernel == "2:4" else _prune_(linear, 0.75)
    sparse = build_sparse(linear, kernel, block_size=(4, 4))
    assert isinstance(sparse, {"csr": CSRLinear, "bsr": BSRLinear, "2:4": SemiStructuredLinear}[kernel])
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = linear(x)
        got = sparse(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", ["csr", "bsr"])
def test_empty_weight(kernel):
    linear = nn.Linear(16, 8)
    with torch.no_grad():
        linear.weight.zero_()
    sparse = build_sparse(linear, kernel)
    for x in (torch.randn(1, 16), torch.randn(4, 16)):
        torch.testing.assert_close(sparse(x), linear(x).detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("config", [
    {"kernel_size": 3, "stride": 1, "padding": 1},
    {"kernel_size": 3, "stride": 2, "padding": 0},
    {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 0), "dilation": (1, 2)},
    {"kernel_size": 1, "bias": False},
    {"kernel_size": 3, "padding": "valid"},
])
def test_csr_conv2d_equals_conv(config):
    torch.manual_seed(0)
    conv = _prune_(nn.Conv2d(3, 8, **config), 0.7)
    sparse = build_sparse(conv, "csr")
    assert isinstance(sparse, CSRConv2d)
    for x in (torch.randn(2, 3, 9, 10), torch.randn(3, 9, 10)):
        with torch.no_grad():
            torch.testing.assert_close(sparse(x), conv(x), atol=1e-5, rtol=0)


def test_unsupported_conv_stays_dense_in_csr_form():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    new = materialise(model, "csr", example_input=torch.randn(2, 4, 6, 6))
    assert type(new[0]) is nn.Conv2d and isinstance(new[2], CSRLinear)
    note = new.materialise_report.layers[0].note
    assert new.materialise_report.layers[0].kernel == "dense" and "groups=2" in note


@pytest.mark.parametrize("kernel", ["csr", "bsr", "2:4"])
def test_state_dict_holds_format_tensors_and_loads(kernel):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    for layer in (model[0], model[2]):
        _prune_24_(layer) if kernel == "2:4" else _prune_(layer, 0.6)
    x = torch.randn(3, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = materialise(model, kernel, example_input=x)
    state = new.state_dict()
    expected_keys = {"csr": {"crow_indices", "col_indices", "values"}, "bsr": {"crow_indices", "col_indices", "values"},
                     "2:4": {"values", "metadata"}}[kernel]
    assert {k.split(".", 1)[1] for k in state if k.startswith("0.")} == expected_keys | {"bias", "_extra_state"}
    assert "0.weight" not in state
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded_state = torch.load(buffer)  # weights_only: extra state is plain dicts/lists

    fresh = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))  # different, dense weights
    loaded = load_materialised(fresh, loaded_state).eval()
    assert type(loaded[0]) is type(new[0]) and type(fresh[0]) is nn.Linear  # fresh untouched
    with torch.no_grad():
        assert torch.equal(loaded(x), new(x))


def test_load_state_dict_resizes_to_other_nnz():
    a = build_sparse(_prune_(nn.Linear(16, 8), 0.9, seed=1), "csr")
    b = build_sparse(_prune_(nn.Linear(16, 8), 0.3, seed=2), "csr")
    assert a.values.shape != b.values.shape
    a.load_state_dict(b.state_dict())
    x = torch.randn(2, 16)
    assert torch.equal(a(x), b(x))


def test_load_rejects_other_module_kind():
    csr = build_sparse(_prune_(nn.Linear(16, 8), 0.5), "csr")
    bsr = build_sparse(_prune_(nn.Linear(16, 8), 0.5), "bsr")
    with pytest.raises(PrunelabError, match="load_materialised"):
        csr.load_state_dict(bsr.state_dict())


def test_deepcopy_to_and_in_place_edits_after_use():
    linear = _prune_(nn.Linear(16, 8), 0.5)
    sparse = build_sparse(linear, "csr")
    x = torch.randn(2, 16)
    before = sparse(x)
    clone = copy.deepcopy(sparse)  # the cached torch.sparse_csr matrix cannot be deep-copied; it is dropped
    assert torch.equal(clone(x), before)
    with torch.no_grad():
        clone.values.mul_(2)
        clone.bias.zero_()
    torch.testing.assert_close(clone(x), 2 * (before - linear.bias.detach()), atol=1e-5, rtol=0)
    assert torch.equal(sparse(x), before)
    double = copy.deepcopy(sparse).double()
    assert double(x.double()).dtype == torch.float64


def test_two_four_dense_fallback_tracks_in_place_edits():
    layer = build_sparse(_prune_24_(nn.Linear(8, 4)), "2:4")
    assert not layer.accelerated  # no sm80+ GPU in CI
    x = torch.randn(1, 8)
    first = layer(x)
    with torch.no_grad():
        layer.values.zero_()
    torch.testing.assert_close(layer(x), layer.bias.expand_as(first))


def _pretend_gpu(monkeypatch, convert) -> None:
    """Make the CPU look like an sm80+ GPU whose 2:4 conversion is ``convert``."""
    from prunelab.materialise import sparse_modules

    monkeypatch.setattr(sparse_modules, "semi_structured_available", lambda device: True)
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", convert)


def test_two_four_form_reports_a_weight_the_gpu_kernels_refuse(monkeypatch):
    def refuse(dense):
        raise RuntimeError("Error original_tensor.dtype torch.float32 is not a supported dtype")

    _pretend_gpu(monkeypatch, refuse)
    model = nn.Sequential(_prune_24_(nn.Linear(8, 4)))
    x = torch.randn(3, 8)
    with pytest.warns(UserWarning, match="fall back to dense"):
        new = materialise(model, "2:4", example_input=x)
    assert not new[0].accelerated
    assert [f.note for f in new.materialise_report.layers] == ["dense fallback"]
    torch.testing.assert_close(new(x), model(x), atol=1e-6, rtol=0)


def test_two_four_form_uses_the_gpu_kernel_weight_when_accepted(monkeypatch):
    converted = []

    def accept(dense):
        converted.append(dense.shape)
        return dense

    _pretend_gpu(monkeypatch, accept)
    model = nn.Sequential(_prune_24_(nn.Linear(8, 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        new = materialise(model, "2:4", example_input=torch.randn(3, 8))
    assert new[0].accelerated
    assert [f.note for f in new.materialise_report.layers] == [""]
    assert converted == [torch.Size([4, 8])]  # converted once, then cached


def test_first_use_under_inference_mode_keeps_autograd_working():
    sparse = build_sparse(_prune_(nn.Linear(16, 8), 0.5), "csr")
    with torch.inference_mode():
        sparse(torch.randn(2, 16))  # builds the cached sparse matrix
    x = torch.randn(2, 16, requires_grad=True)
    sparse(x).sum().backward()
    assert x.grad.shape == x.shape


def test_conv_model_state_dict_round_trip():
    torch.manual_seed(0)
    model = nn.Sequential(_prune_(nn.Conv2d(2, 4, 3, stride=2, padding=1), 0.6), nn.ReLU(), nn.Flatten(),
                          _prune_(nn.Linear(4 * 3 * 3, 5), 0.6)).eval()
    x = torch.randn(2, 2, 6, 6)
    new = materialise(model, "csr", example_input=x)
    assert isinstance(new[0], CSRConv2d)
    fresh = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(36, 5))
    loaded = load_materialised(fresh, new.state_dict())
    assert loaded[0].config == new[0].config
    with torch.no_grad():
        assert torch.equal(loaded(x), new(x))


# --- autotune -----------------------------------------------------------------------------

def _tune_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    _prune_(model[0], 0.8)
    _prune_(model[2], 0.8)
    _block_prune_(model[4])  # BSR-friendly: fill 1.0
    return model.eval()  # model[6] stays dense (no zeros)


def test_autotune_picks_fastest_and_dense_when_sparse_is_slower():
    model = _tune_model()
    timer = FakeTimer({
        ("0", "dense"): 4.0, ("0", "csr"): 1.0, ("0", "bsr"): 2.0,        # csr fastest everywhere
        ("2", "dense"): 4.0, ("2", "csr", 1): 1.0, ("2", "csr", 8): 5.0,  # csr slower at batch 8 -> dense
        ("4", "dense"): 4.0, ("4", "csr"): 3.0, ("4", "bsr"): 2.0,        # bsr fastest
        ("6", "dense"): 1.0,
    })
    inputs = {1: torch.randn(1, 16), 8: torch.randn(8, 16)}
    report = choose_kernels(model, inputs, ("dense", "csr", "bsr"), timer, rounds=3)
    assert report.choices() == {"0": "csr", "2": "dense", "4": "bsr", "6": "dense"}
    by_name = {layer.name: layer for layer in report.layers}
    assert "bsr" in by_name["0"].skipped and "blocks store" in by_name["0"].skipped["bsr"]  # unstructured: BSR skipped
    assert by_name["6"].skipped == {"csr": "no zeros", "bsr": "no zeros"}
    assert by_name["2"].seconds["csr"] == {1: 1.0, 8: 5.0}
    assert by_name["0"].speedup(1) == 4.0 and report.batch_sizes == (1, 8)
    # every timed candidate was measured 3 times per batch, candidates interleaved within a round
    assert timer.calls.count(("4", "bsr", 8)) == 3
    first_round = [c for c in timer.calls if c[0] == "4" and c[2] == 1][:3]
    assert [c[1] for c in first_round] == ["dense", "csr", "bsr"]
    assert "kernel" in report.table() and len(report.rows()) == 4


def test_autotune_ties_and_equal_speed_keep_dense():
    model = _tune_model()
    timer = FakeTimer({("0", "dense"): 2.0, ("0", "csr"): 2.0})
    report = choose_kernels(model, {1: torch.randn(1, 16)}, ("csr",), timer, layers=["0"])
    assert report.choices() == {"0": "dense"}


def test_autotune_keeps_each_kernels_fastest_round():
    """Load from other work only adds time: a kernel slowed in two of three rounds is still judged by its third."""
    model = _tune_model()
    times = iter([2.0, 100.0, 2.5, 90.0, 2.2, 1.5])  # dense, csr per round

    report = choose_kernels(model, {1: torch.randn(1, 16)}, ("csr",), lambda trial: next(times), layers=["0"], rounds=3)
    assert report.choices() == {"0": "csr"}
    assert report.layers[0].seconds == {"dense": {1: 2.0}, "csr": {1: 1.5}}


def test_autotune_rejects_bad_arguments():
    model = _tune_model()
    with pytest.raises(PrunelabError, match="valid kernels"):
        choose_kernels(model, {1: torch.randn(1, 16)}, ("dense", "ell"))
    with pytest.raises(PrunelabError, match="batch size"):
        choose_kernels(model, [torch.randn(1, 16)])
    with pytest.raises(PrunelabError, match="not Linear/Conv"):
        choose_kernels(model, {1: torch.randn(1, 16)}, layers=["1"])


def test_choose_kernels_with_the_real_timer_runs():
    timer = lambda trial: median_timer(trial, warmup=1, repeats=1, min_sample_s=0.0)
    report = choose_kernels(_tune_model(), {1: torch.randn(1, 16), 4: torch.randn(4, 16)}, ("csr", "bsr"), timer,
                            rounds=1)
    assert set(report.choices().values()) <= {"dense", "csr", "bsr"}
    assert all(set(layer.seconds["dense"]) == {1, 4} for layer in report.layers)


def test_median_timer_runs_and_returns_seconds():
    calls = []
    seconds = median_timer(lambda: calls.append(1), warmup=1, repeats=3, min_sample_s=0.0)
    assert seconds >= 0 and len(calls) == 1 + 3


# --- materialise --------------------------------------------------------------------------

def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


@pytest.mark.parametrize("form", ["csr", "bsr", "auto"])
def test_materialise_leaves_original_unchanged(form):
    model = _mlp()
    state, types_before = _snapshot(model)
    x = torch.randn(4, 32)
    new = materialise(model, form, example_input=x, batch_sizes=(1, 4),
                      timer=FakeTimer({}) if form == "auto" else None)
    assert new is not model
    after, types_after = _snapshot(model)
    assert types_after == types_before and all(torch.equal(state[k], after[k]) for k in state)
    report = new.materialise_report
    assert report.form == form and report.max_abs_error <= 1e-4 * report.output_scale
    assert [l.name for l in report.layers] == ["0", "2", "4"]
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), atol=1e-5, rtol=0)


def test_materialise_applies_masks_to_the_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    masks = MaskSet({"0.weight": torch.rand(8, 16) > 0.7})
    before = model[0].weight.detach().clone()
    new = materialise(model, "csr", masks=masks, example_input=torch.randn(2, 16))
    assert torch.equal(model[0].weight, before)                 # original still dense
    assert isinstance(new[0], CSRLinear) and type(new[2]) is nn.Linear  # only masked layers are targets
    assert torch.equal(new[0].dense_weight(), before * masks["0.weight"])
    table = new.materialise_report.table()
    assert "csr" in table and "max abs error" in table


def test_materialise_auto_follows_the_timer():
    model = _mlp()
    timer = FakeTimer({("0", "dense"): 2.0, ("0", "csr"): 1.0, ("2", "dense"): 1.0, ("2", "csr"): 2.0})
    new = materialise(model, "auto", example_input=torch.randn(2, 32), timer=timer, batch_sizes=(1, 64))
    assert isinstance(new[0], CSRLinear) and type(new[2]) is nn.Linear and type(new[4]) is nn.Linear
    assert new.materialise_report.kernels.choices() == {"0": "csr", "2": "dense", "4": "dense"}
    assert {c[2] for c in timer.calls} == {1, 64}


def test_materialise_unknown_form_lists_valid_forms():
    with pytest.raises(PrunelabError) as info:
        materialise(_mlp(), "ell", example_input=torch.randn(1, 32))
    for name in ("2:4", "auto", "bsr", "csr", "shrink"):
        assert name in str(info.value)
    assert set(FORMS.names()) == {"2:4", "auto", "bsr", "csr", "shrink"}


def test_materialise_needs_example_input():
    with pytest.raises(PrunelabError, match="example_input"):
        materialise(_mlp(), "csr")


def test_materialise_24_rejects_unpatterned_weights():
    with pytest.raises(PrunelabError, match=r"'0.weight'.*--granularity 2:4"):
        materialise(_mlp(), "2:4", example_input=torch.randn(1, 32))


def test_materialise_24_warns_once_per_call_on_cpu():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    _prune_24_(model[0])
    _prune_24_(model[2])
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            new = materialise(model, "2:4", example_input=torch.randn(2, 16))
        relevant = [w for w in caught if "Ampere" in str(w.message)]
        assert len(relevant) == 1 and "0, 2" in str(relevant[0].message)
    assert isinstance(new[0], SemiStructuredLinear) and new.materialise_report.layers[0].note == "dense fallback"


def test_materialise_raises_when_the_result_is_wrong(monkeypatch):
    monkeypatch.setattr(CSRLinear, "_matmul", lambda self, x: torch.zeros(x.shape[0], self.weight_shape[0]))
    with pytest.raises(PrunelabError, match="differs from the masked model"):
        materialise(_mlp(), "csr", example_input=torch.randn(2, 32))


def test_shrink_form_delegates_lazily(monkeypatch):
    calls = []

    def shrink_model(model, masks, example_input):
        calls.append((model, masks, example_input))
        return copy.deepcopy(model)

    fake = types.ModuleType("prunelab.materialise.shrink")
    fake.shrink_model = shrink_model
    monkeypatch.setitem(sys.modules, "prunelab.materialise.shrink", fake)
    model = _mlp()
    x = torch.randn(2, 32)
    new = materialise(model, "shrink", example_input=x)
    (got_model, got_masks, got_x), = calls
    assert got_model is not model and got_x is x
    assert set(got_masks) == {"0.weight", "2.weight", "4.weight"}
    assert torch.equal(got_masks["0.weight"], model[0].weight != 0)
    assert new.materialise_report.form == "shrink" and new.materialise_report.max_abs_error == 0.0


@pytest.mark.parametrize("block", [(8, 1), (1, 4), (2, 4)])
def test_bsr_linear_with_non_square_blocks_runs_on_cpu(block):
    # MKL takes square blocks only; a non-square BSR used to raise RuntimeError at forward
    linear = _block_prune_(nn.Linear(16, 8), block=block, keep_every=2)
    sparse = BSRLinear.from_linear(linear, block_size=block)
    x = torch.randn(5, 3, 16)
    for inputs in (x, x[0], x[0, :1]):
        assert torch.allclose(sparse(inputs), linear(inputs), atol=1e-5)
    loaded = load_materialised(nn.Sequential(nn.Linear(16, 8)), nn.Sequential(sparse).state_dict())
    assert torch.allclose(loaded(x), linear(x), atol=1e-5)
    with torch.no_grad():  # in-place edits of the stored blocks show through the CSR stand-in
        sparse.values.mul_(2)
    assert torch.allclose(sparse(x), 2 * (linear(x) - linear.bias) + linear.bias, atol=1e-5)
    new = materialise(nn.Sequential(linear), "bsr", block_size=block, example_input=x[0])
    assert new.materialise_report.layers[0].kernel == "bsr"


@pytest.mark.parametrize("form", ["csr", "bsr", "auto"])
def test_multihead_attention_out_proj_stays_dense(form):
    # MultiheadAttention reads out_proj.weight itself; swapping out_proj used to raise AttributeError
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            return self.fc(self.att(x, x, x)[0])

    model = Attn()
    _prune_(model.att.out_proj, 0.5)
    _prune_(model.fc, 0.5)
    timer = FakeTimer({}) if form == "auto" else None
    new = materialise(model, form, example_input=torch.randn(2, 3, 16), timer=timer)
    forms = {f.name: f for f in new.materialise_report.layers}
    assert forms["att.out_proj"].kernel == "dense" and "MultiheadAttention" in forms["att.out_proj"].note
    assert isinstance(new.att.out_proj, nn.Linear)


def test_cli_materialise_failure_leaves_no_output_folder(tmp_path):
    # `prunelab materialise` created --out before loading anything, leaving an empty folder on failure
    import argparse

    from prunelab.cli_materialise import cmd_materialise

    out = tmp_path / "new" / "out"
    args = argparse.Namespace(checkpoint=str(tmp_path / "missing"), form="csr", out=str(out), data_dir=None,
                              silence_pruned_channels=False)
    with pytest.raises(PrunelabError):
        cmd_materialise(args)
    assert not out.exists()
