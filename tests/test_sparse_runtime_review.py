"""Review regressions for the sparse-format runtime: loading, damaged formats, odd shapes, the 2:4 GPU path."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import prunelab
from prunelab.errors import PrunelabError
from prunelab.materialise import materialise
from prunelab.materialise.autotune import choose_kernels
from prunelab.materialise.formats import SemiStructured24
from prunelab.materialise.sparse_modules import (
    BSRLinear, CSRLinear, build_sparse, kernel_unavailable_reason, load_materialised,
)

pytestmark = pytest.mark.filterwarnings("ignore:Sparse (CSR|BSR) tensor support is in beta")


def _half_zero(linear: nn.Module) -> nn.Module:
    """Zero every other input column: 2:4 sparse (positions 1 and 3 kept), BSR 1x2-friendly."""
    with torch.no_grad():
        linear.weight[..., ::2] = 0
    return linear


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(_half_zero(nn.Linear(8, 8)), nn.ReLU(), _half_zero(nn.Linear(8, 4))).eval()


# --- load_materialised ------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["csr", "bsr", "2:4"])
def test_load_materialised_does_not_share_memory_with_the_state_dict(form):
    new = materialise(_mlp(), form, example_input=torch.randn(2, 8), block_size=(2, 2)) if form != "2:4" else None
    if new is None:
        with pytest.warns(UserWarning, match="fall back to dense"):
            new = materialise(_mlp(), form, example_input=torch.randn(2, 8))
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = new(x)
        loaded = load_materialised(_mlp(), new.state_dict())  # the state_dict's tensors are new's live buffers
        assert torch.equal(loaded(x), before)
        loaded[0].values.mul_(2)                                # edit the loaded copy in place
        assert torch.equal(new(x), before)                      # the source model is untouched
    assert loaded[0].values.data_ptr() != new[0].values.data_ptr()


def test_load_materialised_mismatch_message_names_the_problem():
    model = _mlp()
    new = materialise(model, "csr", example_input=torch.randn(2, 8), masks={"0.weight": model[0].weight != 0})
    assert type(new[2]) is nn.Linear  # not masked: stays dense, so the architecture must match there
    other = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 5))
    with pytest.raises(PrunelabError, match=r"size mismatch for 2\.weight") as info:
        load_materialised(other, new.state_dict())
    assert "\n" not in str(info.value)


# --- damaged formats: one-line errors, never an out-of-bounds read ------------------------------

_DAMAGE = textwrap.dedent("""
    import sys, warnings, torch
    from torch import nn
    from prunelab.errors import PrunelabError
    from prunelab.materialise.sparse_modules import build_sparse, load_materialised
    warnings.simplefilter("ignore")

    def damaged(kind):
        lin = nn.Linear(64, 64)
        with torch.no_grad():
            lin.weight[:, ::2] = 0
        module = build_sparse(lin, kind.split("-")[0], block_size=(2, 2))
        state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in module.state_dict().items()}
        if kind.endswith("columns"):
            state["col_indices"] = state["col_indices"] + 10**6
        elif kind.endswith("rows-cut"):
            state["crow_indices"] = state["crow_indices"][:-3]
        elif kind.endswith("last-pointer"):
            state["crow_indices"][-1] += 1
        elif kind.endswith("values-cut"):
            state["values"] = state["values"][:, :-2]
        return module, state

    how = sys.argv[1]
    for kind in ("csr-columns", "csr-rows-cut", "csr-last-pointer", "bsr-columns", "bsr-rows-cut", "2:4-values-cut"):
        for batch in (1, 5):
            module, state = damaged(kind)
            if how == "module":          # load_state_dict into a live module (shapes follow the stored tensors)
                module.load_state_dict(state)
            else:                        # load_materialised into a dense architecture
                module = load_materialised(nn.Sequential(nn.Linear(64, 64)), {"0." + k: v for k, v in state.items()})
            try:
                module(torch.randn(batch, 64))
            except PrunelabError as exc:
                assert "holds a damaged" in str(exc) and "\\n" not in str(exc), exc
            else:
                raise SystemExit(f"{kind} batch {batch}: no error")
            print("refused", kind, batch, flush=True)
""")


@pytest.mark.parametrize("how", ["module", "load_materialised"])
def test_a_damaged_format_is_a_one_line_error_at_first_use_not_an_out_of_bounds_read(how):
    # before: the kernels ran with check_invariants=False: columns out of range or a row pointer past nnz
    # segfaulted (rc -11) and cut row pointers ran silently -- so this runs in a child process
    src = str(Path(prunelab.__file__).resolve().parents[1])  # the prunelab this test imported
    done = subprocess.run([sys.executable, "-c", _DAMAGE, how], capture_output=True, text=True, timeout=120,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": src})
    assert done.returncode == 0 and done.stdout.count("refused") == 12, (done.returncode, done.stdout, done.stderr[-500:])


# --- odd shapes and inputs --------------------------------------------------------------------

def test_two_four_reason_and_autotune_for_a_layer_with_no_rows():
    layer = nn.Linear(8, 0)
    assert kernel_unavailable_reason(layer, "2:4") is None  # was: RuntimeError from reshape(0, -1, 4)
    report = choose_kernels(nn.Sequential(layer), {1: torch.randn(1, 8)}, ("csr", "bsr", "2:4"), lambda trial: 1.0)
    assert report.choices() == {"0": "dense"}
    assert report.layers[0].skipped["2:4"] == "no zeros"


def test_csr_conv2d_refuses_a_wrong_rank_input_like_conv2d():
    conv = nn.Conv2d(2, 3, 3)
    sparse = build_sparse(conv, "csr")
    for bad in (torch.randn(2, 6), torch.randn(1, 1, 2, 6, 6)):
        with pytest.raises(RuntimeError, match=r"expects inputs \(B, C, H, W\) or \(C, H, W\)"):
            sparse(bad)
        with pytest.raises(RuntimeError):
            conv(bad)


@pytest.mark.parametrize("form", ["csr", "bsr", "2:4", "auto"])
def test_materialise_of_a_bare_layer_is_a_one_line_error_not_a_silent_dense_copy(form):
    with pytest.raises(PrunelabError, match=r"wrap it: materialise\(nn.Sequential\(layer\)"):
        materialise(_half_zero(nn.Linear(8, 4)), form, example_input=torch.randn(2, 8), timer=lambda trial: 1.0)
    wrapped = materialise(nn.Sequential(_half_zero(nn.Linear(8, 4))), "csr", example_input=torch.randn(2, 8))
    assert isinstance(wrapped[0], CSRLinear)


@pytest.mark.parametrize("kernel,block", [("csr", (1, 1)), ("bsr", (2, 2)), ("bsr", (1, 2)), ("2:4", (1, 1))])
def test_batch_one_non_contiguous_and_unbatched_inputs_equal_the_dense_layer(kernel, block):
    torch.manual_seed(0)
    linear = _half_zero(nn.Linear(16, 6)).eval()
    sparse = build_sparse(linear, kernel, block_size=block)
    inputs = [torch.randn(32, 1)[::2].t(),   # batch 1, row stride 2
              torch.randn(16),               # unbatched (in,) -> (out,)
              torch.randn(0, 16),            # empty batch
              torch.randn(4, 3, 32)[..., ::2]]  # (B, T, F), non-contiguous
    with torch.no_grad():
        for x in inputs:
            expected, got = linear(x), sparse(x)
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# --- formats ----------------------------------------------------------------------------------

def test_two_four_trailing_int16_holds_only_the_last_group():
    # 1x20: 5 groups -> 2 int16s; the second holds group 4 in bits 0..3 and zero padding above
    w = torch.zeros(1, 20)
    w[0, 17], w[0, 18] = 1.0, 2.0        # group 4: positions (1, 2) -> 1 | 2 << 2 = 9
    fmt = SemiStructured24.from_dense(w)
    assert fmt.metadata.tolist() == [[4 | 4 << 4 | 4 << 8 | 4 << 12, 9]]  # empty groups: (0, 1) = 4
    assert fmt.values.tolist() == [[0.0] * 8 + [1.0, 2.0]]
    assert torch.equal(fmt.to_dense(), w)


def test_bsr_linear_with_a_fully_zero_weight_and_no_bias_returns_zeros():
    linear = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        linear.weight.zero_()
    for block in ((2, 2), (4, 1)):
        sparse = build_sparse(linear, "bsr", block_size=block)
        assert isinstance(sparse, BSRLinear) and sparse.nnz == 0
        for x in (torch.randn(1, 8), torch.randn(3, 8)):
            assert torch.equal(sparse(x), torch.zeros(x.shape[0], 4))
