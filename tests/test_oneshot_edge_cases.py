"""One-shot pruning edge cases: keyword inputs, exact small solver cases, layer orientations, precisions."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.oneshot import SOLVERS, InputStats, OneShotConfig, prune_obs, prune_oneshot, prune_sparsegpt
from prunelab.oneshot.diagnostics import input_norm_spread
from prunelab.oneshot.layer_targets import LayerTarget, classify_layer
from prunelab.oneshot.magnitude import prune_count


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --- layers and blocks whose inputs arrive by keyword ----------------------------------------
class _Block(nn.Module):
    """Two Linears; ``by_keyword`` calls them as ``fc(input=x)``; returns a tuple like transformers blocks."""

    def __init__(self, by_keyword: bool) -> None:
        super().__init__()
        self.by_keyword = by_keyword
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, None]:
        if self.by_keyword:
            h = self.fc2(input=torch.tanh(self.fc1(input=x)))
        else:
            h = self.fc2(torch.tanh(self.fc1(x)))
        return x + scale * h, None


class _Net(nn.Module):
    """``block_by_keyword`` calls each block as ``block(x=h, scale=...)`` (no positional hidden states)."""

    def __init__(self, by_keyword: bool, block_by_keyword: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block_by_keyword = block_by_keyword
        self.layers = nn.ModuleList(_Block(by_keyword) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = (block(x=x, scale=0.5) if self.block_by_keyword else block(x, 0.5))[0]
        return x


def _calibration() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 6, 8, generator=gen) for _ in range(2)]


@pytest.mark.parametrize("config", [OneShotConfig(method=m) for m in SOLVERS.names()]
                         + [OneShotConfig(method="sparsegpt", dense_targets=True, bias_correction=True)])
def test_layers_called_with_keyword_inputs_prune_like_positional_ones(config):
    positional, keyword = _Net(by_keyword=False), _Net(by_keyword=True)
    a = prune_oneshot(positional, _calibration(), config, progress=False)
    b = prune_oneshot(keyword, _calibration(), config, progress=False)
    assert [row.name for row in b.rows] == ["layers.0.fc1", "layers.0.fc2", "layers.1.fc1", "layers.1.fc2"]
    assert all(torch.equal(a.masks[name], b.masks[name]) for name in a.masks)
    for p, q in zip(positional.parameters(), keyword.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert [row.error for row in a.rows] == pytest.approx([row.error for row in b.rows], rel=1e-9)
    assert _no_hooks(keyword)


def test_blocks_called_with_their_hidden_states_by_keyword_are_chained():
    positional, keyword = _Net(by_keyword=False), _Net(by_keyword=False, block_by_keyword=True)
    a = prune_oneshot(positional, _calibration(), OneShotConfig(method="sparsegpt"), progress=False)
    b = prune_oneshot(keyword, _calibration(), OneShotConfig(method="sparsegpt"), progress=False)
    assert all(torch.equal(a.masks[name], b.masks[name]) for name in a.masks)
    for p, q in zip(positional.parameters(), keyword.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_input_norm_spread_reads_keyword_inputs():
    x = _calibration()
    assert input_norm_spread(_Net(by_keyword=True), x) == pytest.approx(input_norm_spread(_Net(by_keyword=False), x))


# --- exact small cases ---------------------------------------------------------------------------
def _sequential_elimination(W: torch.Tensor, H: torch.Tensor, sparsity: float, damp: float = 0.01):
    """SparseGPT with one-column blocks written out without Cholesky: at column i the remaining
    problem is over columns ``i..`` with inverse ``(H[i:, i:])^{-1}``; prune the lowest
    ``w_i^2 / [H_F^{-1}]_ii`` of the column's share and apply the OBS update
    ``w_F -= w_i / [H_F^{-1}]_ii * H_F^{-1}[i, :]`` to those rows."""
    cols = W.shape[1]
    H = H + damp * torch.diagonal(H).mean() * torch.eye(cols, dtype=H.dtype)
    W, keep = W.clone(), torch.ones_like(W, dtype=torch.bool)
    for i in range(cols):
        Hinv = torch.linalg.inv(H[i:, i:])  # (cols - i, cols - i)
        k = prune_count(W.shape[0] * (i + 1), sparsity) - prune_count(W.shape[0] * i, sparsity)
        for r in torch.topk(W[:, i].square() / Hinv[0, 0], k, largest=False).indices.tolist():
            W[r, i:] -= W[r, i] / Hinv[0, 0] * Hinv[0]
            keep[r, i] = False
        W[~keep[:, i], i] = 0.0
    return W, keep


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_sparsegpt_with_one_column_blocks_is_sequential_obs_elimination(sparsity):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    X = torch.randn(4, 3, generator=gen, dtype=torch.float64)  # 3 calibration rows: H has rank 3
    X[1] = 0.5 * X[0] + 0.1 * X[1]  # correlated inputs
    H = 2 * X @ X.T / 3
    config = OneShotConfig(method="sparsegpt", sparsity=sparsity, block_size=1)
    sol = prune_sparsegpt(W, InputStats(hessian=H, count=3), config)
    expected, keep = _sequential_elimination(W, H, sparsity)
    assert torch.equal(sol.mask, keep) and int((~keep).sum()) == prune_count(8, sparsity)
    torch.testing.assert_close(sol.weight, expected, rtol=1e-10, atol=1e-12)


def _greedy_obs(W: torch.Tensor, H: torch.Tensor, k: int, damp: float = 0.01):
    """Per row: k times remove the weight of least ``w_q^2 / (2 [H_F^{-1}]_qq)`` over the alive set F
    and re-optimise the others, inverting ``H[F, F]`` afresh each time."""
    H = H + damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    out, keep = W.clone(), torch.ones_like(W, dtype=torch.bool)
    for r in range(W.shape[0]):
        alive = list(range(W.shape[1]))
        for _ in range(k):
            Hinv = torch.linalg.inv(H[alive][:, alive])
            j = int((out[r, alive].square() / (2 * torch.diagonal(Hinv))).argmin())
            out[r, alive] -= out[r, alive[j]] / Hinv[j, j] * Hinv[:, j]
            keep[r, alive.pop(j)] = False
        out[r, ~keep[r]] = 0.0
    return out, keep


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_obs_is_exact_greedy_elimination(k):
    gen = torch.Generator().manual_seed(k)
    W = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    X = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    X[1] += X[0]
    H = 2 * X @ X.T / 10
    sol = prune_obs(W, InputStats(hessian=H, count=10), OneShotConfig(method="obs", sparsity=k / 6))
    expected, keep = _greedy_obs(W, H, k)
    assert torch.equal(sol.mask, keep)
    torch.testing.assert_close(sol.weight, expected, rtol=1e-10, atol=1e-12)


# --- orientations and precisions ---------------------------------------------------------------
@pytest.mark.parametrize("options", [dict(kernel_size=3, padding=1),
                                     dict(kernel_size=(3, 2), stride=2, dilation=(1, 2), padding=(2, 1)),
                                     dict(kernel_size=3, padding="same", dilation=2)])
def test_conv2d_im2col_reproduces_the_convolution(options):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, bias=False, **options)
    target = classify_layer("conv", conv)
    assert isinstance(target, LayerTarget)
    x = torch.randn(2, 4, 9, 8)
    expected = conv(x).permute(0, 2, 3, 1).reshape(-1, 5)  # (B * L, O)
    torch.testing.assert_close(target.inputs2d(x) @ target.weight2d().T, expected, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_layers_prune_like_the_transposed_linears():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")

    class Mlp(nn.Module):
        def __init__(self, conv1d: bool) -> None:
            super().__init__()
            self.up = pytorch_utils.Conv1D(24, 8) if conv1d else nn.Linear(8, 24)
            self.down = pytorch_utils.Conv1D(8, 24) if conv1d else nn.Linear(24, 8)

        def forward(self, x):
            return x + self.down(torch.relu(self.up(x)))

    conv_model = nn.Sequential(Mlp(True), Mlp(True))
    linear_model = nn.Sequential(Mlp(False), Mlp(False))
    with torch.no_grad():
        for p, q in zip(conv_model.parameters(), linear_model.parameters(), strict=True):
            q.copy_(p.T if p.dim() == 2 else p)
    calibration = _calibration()
    for method in SOLVERS.names():
        for pattern in (None, "2:4"):
            a, b = copy.deepcopy(conv_model), copy.deepcopy(linear_model)
            config = OneShotConfig(method=method, pattern=pattern)
            ra = prune_oneshot(a, calibration, config, progress=False)
            rb = prune_oneshot(b, calibration, config, progress=False)
            assert all(torch.equal(ra.masks[name].T, rb.masks[name]) for name in rb.masks), (method, pattern)
            for p, q in zip(a.parameters(), b.parameters(), strict=True):
                torch.testing.assert_close(p.T if p.dim() == 2 else p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_half_precision_models_keep_their_dtype_and_exact_masks(dtype, pattern):
    for method in SOLVERS.names():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to(dtype)
        calibration = [torch.randn(24, 16).to(dtype)]
        report = prune_oneshot(model, calibration, OneShotConfig(method=method, sparsity=0.5, pattern=pattern),
                               progress=False)
        for row in report.rows:
            weight, keep = model.get_submodule(row.name).weight, report.masks[f"{row.name}.weight"]
            assert weight.dtype == dtype and bool(torch.isfinite(weight).all())
            assert not bool(weight[~keep].any())
            if pattern:
                assert bool((keep.view(weight.shape[0], -1, 4).sum(-1) == 2).all())
            else:
                assert int((~keep).sum()) == weight.numel() // 2


def test_a_layer_called_without_any_input_is_a_one_line_error():
    class Odd(nn.Linear):
        def forward(self, *, a, b):  # two keyword tensors: which one is the input is unknown
            return F.linear(a + b, self.weight, self.bias)

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.odd = Odd(4, 4)

        def forward(self, x):
            return self.odd(a=x, b=x)

    model = nn.Sequential(Holder())
    with pytest.raises(PrunelabError, match="called without its input") as info:
        prune_oneshot(model, [torch.randn(5, 4)], OneShotConfig(method="wanda"), progress=False)
    assert "\n" not in str(info.value) and _no_hooks(model)


def test_an_expert_that_item_0_does_not_route_to_is_still_pruned():
    """Conditional computation: the probe keeps looking at later items until every layer was called."""

    class Routed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Linear(4, 4)
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            self.out = nn.Linear(4, 4)

        def forward(self, x):
            h = self.gate(x)
            h = self.experts[0 if float(x.sum()) > 0 else 1](h)  # the whole item goes to one expert
            return x + self.out(h)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layers = nn.ModuleList(Routed() for _ in range(2))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    gen = torch.Generator().manual_seed(0)
    calibration = [torch.rand(8, 4, generator=gen) + 1, -torch.rand(8, 4, generator=gen) - 5]
    model = Model()
    report = prune_oneshot(model, calibration, OneShotConfig(method="wanda"), progress=False)
    assert report.dense_layers == ()
    assert [row.name for row in report.rows[:4]] == ["layers.0.gate", "layers.0.experts.1", "layers.0.experts.0",
                                                      "layers.0.out"]
    assert all(row.sparsity == 0.5 for row in report.rows) and len(report.rows) == 8
    assert _no_hooks(model)
