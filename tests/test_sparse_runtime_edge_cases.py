"""Edge cases of the sparse-format runtime: dtypes, odd weights and inputs, inference tensors, timing, pooling."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from fake_timer import FakeTimer
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.materialise import materialise
from prunelab.materialise.autotune import Trial, choose_kernels, median_timer
from prunelab.materialise.formats import BSR
from prunelab.materialise.pooling import SeparableMaxPool2d
from prunelab.materialise.sparse_modules import (
    BSRLinear, CSRConv2d, CSRLinear, SemiStructuredLinear, build_sparse, kernel_unavailable_reason,
)

pytestmark = pytest.mark.filterwarnings("ignore:Sparse (CSR|BSR) tensor support is in beta")

LINEAR_KERNELS = [("csr", (4, 4)), ("bsr", (4, 4)), ("bsr", (8, 1)), ("2:4", (4, 4))]


def _linear(weight_case: str, bias: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Linear:
    """A 16x16 Linear whose weight is 2:4 sparse (so every kernel applies) plus the named edge case."""
    torch.manual_seed(seed)
    linear = nn.Linear(16, 16, bias=bias)
    with torch.no_grad():
        linear.weight.view(16, 4, 4)[:, :, 1:3] = 0     # 2:4: keep positions 0 and 3 of every group
        if weight_case == "zero_rows":
            linear.weight[::3] = 0
        elif weight_case == "all_zero":
            linear.weight.zero_()
        elif weight_case == "one_per_group":
            linear.weight.view(16, 4, 4)[:, :, 0] = 0      # a single nonzero in every group
    return linear.to(dtype).eval()


def _inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [
        torch.randn(1, 16, generator=g).to(dtype),                       # batch 1
        torch.randn(5, 16, generator=g).to(dtype),                       # batch > 1
        torch.randn(2, 3, 16, generator=g).to(dtype),                    # (B, T, C)
        torch.randn(16, 5, generator=g).to(dtype).t(),                   # non-contiguous 2-D
        torch.randn(2, 16, 3, generator=g).to(dtype).transpose(1, 2),    # non-contiguous 3-D
    ]


# --- equality with the dense layer --------------------------------------------------------

@pytest.mark.parametrize("weight_case", ["pattern", "zero_rows", "all_zero", "one_per_group"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kernel,block", LINEAR_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_linear_equals_dense_on_edge_weights_and_inputs(kernel, block, bias, weight_case, dtype):
    linear = _linear(weight_case, bias, dtype)
    sparse = build_sparse(linear, kernel, block_size=block)
    for x in _inputs(dtype):
        with torch.no_grad():
            expected, got = linear(x), sparse(x)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kernel,block", LINEAR_KERNELS)
def test_sparse_linear_output_is_contiguous_like_linear(kernel, block):
    """Outputs used to be the transposed view of an (out, N) product: ``y.view(-1)`` raised."""
    sparse = build_sparse(_linear("pattern"), kernel, block_size=block)
    for x in _inputs(torch.float32):
        with torch.no_grad():
            y = sparse(x)
        assert y.is_contiguous()
        assert y.view(-1).shape == (y.numel(),)


def test_csr_conv2d_output_is_contiguous_so_a_view_flatten_works():
    """A CSR conv output used to be a permuted view: LeNet's ``x.view(x.size(0), -1)`` after it raised."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, bias=True)
    with torch.no_grad():
        conv.weight[torch.rand(conv.weight.shape) < 0.8] = 0
    sparse = build_sparse(conv.eval(), "csr")
    for x in (torch.randn(2, 3, 10, 10), torch.randn(3, 10, 10)):
        with torch.no_grad():
            y, expected = sparse(x), conv(x)
        assert y.is_contiguous()
        torch.testing.assert_close(y.view(-1), expected.reshape(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel,block", [kb for kb in LINEAR_KERNELS if kb[0] != "2:4"])  # dense is not 2:4
def test_fully_dense_layer_equals_dense(kernel, block):
    torch.manual_seed(0)
    linear = nn.Linear(16, 8).eval()
    sparse = build_sparse(linear, kernel, block_size=block)
    x = torch.randn(3, 16)
    torch.testing.assert_close(sparse(x), linear(x).detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kernel,block", LINEAR_KERNELS)
def test_half_precision_sparse_linear_runs_on_cpu_and_equals_dense(kernel, block, bias, dtype):
    """MKL has no fp16/bf16 sparse kernels: these used to raise NotImplementedError ("not implemented for 'Half'")."""
    linear = _linear("pattern", bias, dtype)
    sparse = build_sparse(linear, kernel, block_size=block)
    assert sparse.values.dtype == dtype  # storage stays half precision
    for x in _inputs(dtype):
        with torch.no_grad():
            expected, got = linear(x), sparse(x)
        assert got.dtype == dtype and got.shape == expected.shape
        # dense half precision itself rounds differently for 2-D (addmm) and 3-D (matmul + add) inputs:
        # allow a few units in the last place of the output scale
        scale = max(1.0, float(expected.abs().max()))
        torch.testing.assert_close(got, expected, atol=4 * torch.finfo(dtype).eps * scale, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_csr_conv2d_equals_conv(dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    with torch.no_grad():
        conv.weight[torch.rand(conv.weight.shape) < 0.6] = 0
    conv = conv.to(dtype).eval()
    sparse = build_sparse(conv, "csr")
    assert isinstance(sparse, CSRConv2d)
    x = torch.randn(2, 3, 7, 8).to(dtype)
    with torch.no_grad():
        expected, got = conv(x), sparse(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("form", ["csr", "bsr"])
def test_materialise_then_half_and_bf16_models_work(form):
    torch.manual_seed(0)
    model = nn.Sequential(_linear("zero_rows"), nn.ReLU(), _linear("pattern", seed=1)).eval()
    x = torch.randn(4, 16)
    new = materialise(model, form, example_input=x).half()
    torch.testing.assert_close(new(x.half()), model.half()(x.half()))
    bf16 = nn.Sequential(_linear("pattern", dtype=torch.bfloat16)).eval()
    materialise(bf16, form, example_input=x.bfloat16())  # used to raise NotImplementedError in the check


def test_half_precision_layer_tracks_in_place_edits_and_rejects_other_input_dtypes():
    sparse = build_sparse(_linear("pattern", dtype=torch.float16), "csr")
    x = torch.randn(2, 16).half()
    before = sparse(x)
    with torch.no_grad():
        sparse.values.mul_(2)  # the fp32 kernel copy is keyed on buffer versions
        if sparse.bias is not None:
            sparse.bias.mul_(2)
    torch.testing.assert_close(sparse(x), 2 * before)
    with pytest.raises(PrunelabError, match="float16 weights but got a torch.float32 input") as info:
        sparse(torch.randn(2, 16))
    assert "\n" not in str(info.value)


# --- buffers made under torch.inference_mode -----------------------------------------------

@pytest.mark.parametrize("kernel,block", [("bsr", (8, 1)), ("2:4", (4, 4)), ("csr", (4, 4))])
def test_modules_moved_under_inference_mode_still_run(kernel, block):
    """Inference tensors have no version counter: the copying caches (2:4, BSR 8x1) used to raise on them."""
    linear = _linear("pattern")
    x = torch.randn(3, 16)
    with torch.inference_mode():
        sparse = build_sparse(linear, kernel, block_size=block).double()  # buffers become inference tensors
        assert sparse.values.is_inference()
        torch.testing.assert_close(sparse(x.double()), linear.double()(x.double()))
    torch.testing.assert_close(sparse(x.double()), linear(x.double()).detach())


# --- 2:4 errors -----------------------------------------------------------------------------

def test_materialise_24_with_a_mask_that_breaks_the_pattern_names_layer_and_group():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 4)).eval()
    keep = torch.zeros(4, 8, dtype=torch.bool)
    keep[:, [0, 3, 4, 7]] = True
    keep[3, 5] = True  # row 3, group 1 keeps 3 of 4
    with pytest.raises(PrunelabError) as info:
        materialise(model, "2:4", masks={"0.weight": keep}, example_input=torch.randn(2, 8))
    message = str(info.value)
    assert "'0.weight'" in message and "row 3" in message and "group 1" in message and "\n" not in message


# --- BSR block sizes ----------------------------------------------------------------------

@pytest.mark.parametrize("block", [(0, 4), (4,), "4x4", (-4, 4), (4.5, 4)])
def test_malformed_block_size_is_a_one_line_error_everywhere(block):
    """(0, 4) used to raise ZeroDivisionError, "4x4"/(4,) a ValueError, (-4, 4) a torch RuntimeError in auto."""
    model = nn.Sequential(_linear("pattern")).eval()
    x = torch.randn(2, 16)
    for form in ("bsr", "auto"):
        with pytest.raises(PrunelabError, match="BSR block size") as info:
            materialise(model, form, example_input=x, block_size=block)
        assert "\n" not in str(info.value)
    with pytest.raises(PrunelabError, match="BSR block size"):
        kernel_unavailable_reason(model[0], "bsr", block_size=block)
    with pytest.raises(PrunelabError, match="BSR block size"):
        choose_kernels(model, {1: x[:1]}, ("bsr",), FakeTimer({}), block_size=block)
    with pytest.raises(PrunelabError, match="BSR block size"):
        BSR.from_dense(torch.ones(8, 8), block_size=block)


def test_block_size_that_does_not_tile_raises_or_keeps_the_layer_dense():
    from prunelab.materialise.formats import block_shape

    linear = _linear("pattern")
    assert block_shape([2, 8]) == (2, 8)
    with pytest.raises(PrunelabError, match="does not tile"):
        BSR.from_dense(linear.weight, block_size=(3, 3))
    with pytest.raises(PrunelabError, match="cannot use kernel 'bsr'"):
        build_sparse(linear, "bsr", block_size=(3, 3))
    new = materialise(nn.Sequential(linear), "bsr", example_input=torch.randn(2, 16), block_size=(3, 3))
    assert type(new[0]) is nn.Linear and "does not tile" in new.materialise_report.layers[0].note


# --- autotune timing ------------------------------------------------------------------------

def test_median_timer_sizes_the_inner_loop_from_the_fastest_warmup_call():
    """A slow first call (a sparse module building its cached matrix) used to cut the inner loop to 1 call."""
    calls = []

    def fn():
        if not calls:
            time.sleep(0.2)  # one-time cost of the first call
        calls.append(1)

    median_timer(fn, warmup=2, repeats=1, min_sample_s=0.05, max_inner=50)
    assert len(calls) > 2 + 6  # old: inner = ceil(0.05 / (0.2 / 2)) = 1 -> 3 calls


def test_median_timer_synchronizes_around_every_clock_read():
    """CUDA calls return before their kernels run: without a sync the timer measured launches only."""
    events = []

    class Fn:
        def __call__(self):
            events.append("call")

        def synchronize(self):
            events.append("sync")

    median_timer(Fn(), warmup=1, repeats=2, min_sample_s=0.0)
    assert events == ["sync", "call", "sync"] * 3


def test_trial_synchronize_is_a_no_op_on_cpu():
    trial = Trial("0", "dense", 1, nn.Identity(), torch.ones(1))
    trial.synchronize()
    assert torch.equal(trial(), torch.ones(1))


def test_autotune_does_not_time_a_24_dense_fallback():
    """Without sparse tensor cores 2:4 runs dense: timing noise could pick it and hide the fallback."""
    model = nn.Sequential(_linear("pattern")).eval()
    timer = FakeTimer({("0", "dense"): 2.0, ("0", "2:4"): 1.0, ("0", "csr"): 3.0})
    report = choose_kernels(model, {1: torch.randn(1, 16)}, ("csr", "2:4"), timer)
    assert report.choices() == {"0": "dense"}
    assert "dense fallback" in report.layers[0].skipped["2:4"]
    assert all(kernel != "2:4" for _, kernel, _ in timer.calls)


def test_auto_form_notes_say_why_an_untimed_layer_stayed_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), _linear("pattern")).eval()  # model[0] has no zeros
    new = materialise(model, "auto", example_input=torch.randn(2, 16), timer=FakeTimer({("2", "csr"): 0.5}),
                      batch_sizes=(1,))
    notes = {form.name: form.note for form in new.materialise_report.layers}
    assert notes["0"].startswith("kept dense, no sparse kernel applies") and "csr: no zeros" in notes["0"]
    assert notes["2"].startswith("measured")
    assert isinstance(new[2], CSRLinear) and isinstance(build_sparse(_linear("pattern"), "bsr"), BSRLinear)


# --- separable max pool ---------------------------------------------------------------------

@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    (3, 1, 1, 1), ((3, 4), (2, 1), (1, 2), 1), (3, 2, 1, 2), (2, 3, 0, 1),
])
def test_separable_pool_backward_runs_for_kernels_over_two(kernel, stride, padding, dilation):
    """Kernels of 3+ reduce with maximum(out=...), which used to raise under autograd."""
    x = torch.randn(2, 3, 11, 12, requires_grad=True)
    SeparableMaxPool2d(kernel, stride, padding, dilation)(x).sum().backward()
    got, x.grad = x.grad, None
    F.max_pool2d(x, kernel, stride, padding, dilation).sum().backward()
    assert torch.equal(got, x.grad)  # random inputs: no ties, so the gradients are the same


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_separable_pool_is_exact_with_nan_and_infinities(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 13, 11, generator=g).to(dtype)
    flat = x.view(-1)
    flat[::7], flat[::5], flat[::11] = float("nan"), -float("inf"), float("inf")
    for args in [(3, 2, 1, 2), ((2, 3), (3, 1), (1, 1), (2, 1)), (1, 2, 0, 1)]:
        expected, got = F.max_pool2d(x, *args), SeparableMaxPool2d(*args)(x)
        assert got.dtype == expected.dtype and torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got.nan_to_num(0.0), expected.nan_to_num(0.0))
    assert torch.equal(SeparableMaxPool2d(3, 1, 1)(torch.full((1, 4, 4), -float("inf"))),
                       F.max_pool2d(torch.full((1, 4, 4), -float("inf")), 3, 1, 1))


def test_two_four_kernel_output_dtype_and_values_after_double():
    linear = _linear("one_per_group")
    sparse = build_sparse(linear, "2:4").double()
    assert isinstance(sparse, SemiStructuredLinear) and sparse.metadata.dtype == torch.int16
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(sparse(x), linear.double()(x).detach())
