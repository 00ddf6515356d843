"""Regression tests for shrink / materialise fixes: size-1 dim ops (unsqueeze, squeeze(dim), ``x[:, :, None]``,
``x[..., 0]``) move the channel dim like view does; a wrong example_input is one line for every form;
``bench-latency --silence-pruned-channels``; error messages worded for Python and CLI users alike."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from prunelab import PrunelabError, materialise
from prunelab.masks import MaskSet
from prunelab.materialise.formats import SemiStructured24
from prunelab.materialise.graph import build_graph
from prunelab.materialise.shrink import plan_shrink, shrink_model

pytestmark = pytest.mark.usefixtures("one_thread")


def drop_rows(weight: torch.Tensor, drop: list[int]) -> torch.Tensor:
    """A channel / neuron mask pruning rows ``drop`` of ``weight``."""
    mask = torch.ones_like(weight, dtype=torch.bool)
    mask[drop] = False
    return mask


def masked(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    reference = copy.deepcopy(model).eval()
    MaskSet(masks).apply_(reference)
    return reference


# --- 1. where the channel dim goes through size-1 dim ops ---------------------------------------------------
class Moves(nn.Module):
    """A Conv1d output ``h`` (3, 4, 5) -- channel dim 1 -- passed through one expression."""

    def __init__(self, expr) -> None:
        super().__init__()
        self.c = nn.Conv1d(2, 4, 1)
        self.expr = expr

    def forward(self, x):  # (3, 2, 5)
        return self.expr(self.c(x))


# (expression on h of shape (3, 4, 5), channel dim of the result) -- worked out by hand
MOVES = {
    "unsqueeze(0)": (lambda h: h.unsqueeze(0), 2),
    "unsqueeze(1)": (lambda h: h.unsqueeze(1), 2),
    "unsqueeze(2)": (lambda h: h.unsqueeze(2), 1),
    "unsqueeze(-1)": (lambda h: h.unsqueeze(-1), 1),
    "unsqueeze(dim=-3)": (lambda h: h.unsqueeze(dim=-3), 2),  # -3 of rank 4 is position 1
    "torch.unsqueeze(h, 0)": (lambda h: torch.unsqueeze(h, 0), 2),
    "h[None]": (lambda h: h[None], 2),
    "h[:, None]": (lambda h: h[:, None], 2),
    "h[:, :, None, None]": (lambda h: h[:, :, None, None], 1),
    "h[..., None]": (lambda h: h[..., None], 1),
    "h[None, ..., None]": (lambda h: h[None, ..., None], 2),
    "h[0]": (lambda h: h[0], 0),
    "h[:, :, 0]": (lambda h: h[:, :, 0], 1),
    "h[..., 1:3]": (lambda h: h[..., 1:3], 1),
    "h[1:, :, ::2]": (lambda h: h[1:, :, ::2], 1),
    "h[:, 0:]": (lambda h: h[:, 0:], 1),
    "h[:, :, h.size(2) - 1]": (lambda h: h[:, :, h.size(2) - 1], 1),
    "h[:1].squeeze(0)": (lambda h: h[:1].squeeze(0), 0),
    "h[:, :, :1].squeeze(-1)": (lambda h: h[:, :, :1].squeeze(-1), 1),
    "torch.squeeze(h[:, :, :1], 2)": (lambda h: torch.squeeze(h[:, :, :1], 2), 1),
    "h[:, :, :1].squeeze((0, 2))": (lambda h: h[:, :, :1].squeeze((0, 2)), 1),  # dim 0 has size 3: kept
    "h[:1, :, :1].squeeze((0, 2))": (lambda h: h[:1, :, :1].squeeze((0, 2)), 0),
    "h.squeeze(0)": (lambda h: h.squeeze(0), 1),  # size 3: a no-op
}


@pytest.mark.parametrize("case", MOVES, ids=MOVES)
def test_size_one_dim_ops_move_the_channel_dim_as_worked_out_by_hand(case):
    expr, dim = MOVES[case]
    model = Moves(expr).eval()
    x = torch.randn(3, 2, 5)
    graph = build_graph(model, x)
    out = next(n for n in graph.module.graph.nodes if n.op == "output").args[0]
    layout = graph.layout(out)
    assert layout is not None, case  # was a barrier: no channel layout
    assert layout.dim == dim and [(s.size, s.inner) for s in layout.segments] == [(4, 1)]
    assert layout.spaces() == [graph.producers["c"]]
    with torch.no_grad():
        assert model(x).shape[dim] == 4  # the hand-worked dim really holds the 4 channels


class Head(nn.Module):
    """Conv1d (1 -> 3, kernel 1) -> ReLU -> max over time (B, 3, 1) -> a size-1 op -> Linear(3, 2)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.c = nn.Conv1d(1, 3, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):  # (B, 1, T)
        h = torch.relu(self.c(x)).amax(2, keepdim=True)  # (B, 3, 1)
        if self.how == "squeeze(-1)":
            h = h.squeeze(-1)
        elif self.how == "torch.squeeze":
            h = torch.squeeze(h, dim=2)
        elif self.how == "[..., 0]":
            h = h[..., 0]
        else:  # "[:, :, 0]"
            h = h[:, :, 0]
        return self.fc(h)  # (B, 2)


@pytest.mark.parametrize("how", ["squeeze(-1)", "torch.squeeze", "[..., 0]", "[:, :, 0]"])
def test_a_squeezed_head_shrinks_and_folds_the_pruned_constant_by_hand(how):
    model = Head(how).eval()
    with torch.no_grad():
        model.c.weight.copy_(torch.tensor([[[1.0]], [[2.0]], [[-1.0]]]))
        model.c.bias.copy_(torch.tensor([0.0, 0.5, 0.25]))
        model.fc.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 4.0, 0.5]]))
        model.fc.bias.copy_(torch.tensor([0.1, -0.2]))
    masks = {"c.weight": drop_rows(model.c.weight, [1])}
    x = torch.randn(4, 1, 6)
    new = shrink_model(model, masks, x)
    # by hand: channel 1 is relu(0 * x + 0.5) = 0.5 everywhere, so fc's bias gains 0.5 * W[:, 1] = (1.0, 2.0)
    assert (new.c.out_channels, new.fc.in_features) == (2, 2)
    assert torch.equal(new.fc.weight, torch.tensor([[1.0, 3.0], [-1.0, 0.5]]))
    assert torch.allclose(new.fc.bias, torch.tensor([1.1, 1.8]), atol=1e-7)
    with torch.no_grad():
        assert torch.allclose(new(x), masked(model, masks)(x), atol=1e-6)
    assert model.c.out_channels == 3 and model.c.weight[1].item() == 2.0  # the user's model is untouched


class SE(nn.Module):
    """conv1 -> ReLU -> squeeze-and-excitation gate (mean -> fc1 -> ReLU -> fc2 -> sigmoid) -> x * gate -> 1x1 conv2."""

    def __init__(self, gate: str) -> None:
        super().__init__()
        self.gate = gate
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(4, 2), nn.Linear(2, 4)
        self.conv2 = nn.Conv2d(4, 3, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):  # (B, 1, 5, 5)
        x = torch.relu(self.conv1(x))                                    # (B, 4, 5, 5)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))  # (B, 4)
        if self.gate == "unsqueeze":
            s = s.unsqueeze(-1).unsqueeze(-1)
        elif self.gate == "torch.unsqueeze":
            s = torch.unsqueeze(torch.unsqueeze(s, 2), 3)
        elif self.gate == "none_index":
            s = s[:, :, None, None]
        else:  # "ellipsis"
            s = s[..., None, None]
        return self.fc(torch.relu(self.conv2(x * s)).mean((2, 3)))       # (B, 2)


@pytest.mark.parametrize("gate", ["unsqueeze", "torch.unsqueeze", "none_index", "ellipsis"])
def test_squeeze_excitation_gates_with_size_one_dims_shrink_exactly(gate):
    torch.manual_seed(0)
    model = SE(gate).eval()
    # channel 2 pruned by both members of the coupled group (conv1 rows and the gate fc2 rows)
    masks = {"conv1.weight": drop_rows(model.conv1.weight, [2]), "fc2.weight": drop_rows(model.fc2.weight, [2])}
    x = torch.randn(3, 1, 5, 5)
    new = shrink_model(model, masks, x)
    assert (new.conv1.out_channels, new.fc1.in_features, new.fc2.out_features, new.conv2.in_channels) == (3, 3, 3, 3)
    # by hand: the cut channel is relu(b1[2]) * sigmoid(b2[2]) everywhere; 1x1 conv2 folds it into its bias
    constant = torch.relu(model.conv1.bias[2]) * torch.sigmoid(model.fc2.bias[2])
    assert torch.allclose(new.conv2.bias, model.conv2.bias + model.conv2.weight[:, 2, 0, 0] * constant, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(new(x), masked(model, masks)(x), atol=1e-5)


class Refused(nn.Module):
    """Conv1d (2 -> 4) -> ReLU -> max over time (B, 4, 1) -> an op on the channel dim -> Linear."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a = nn.Conv1d(2, 4, 3)
        self.fc = nn.Linear(2 if how == "[:, :2]" else 4, 3)

    def forward(self, x):  # (B, 2, 5)
        h = torch.relu(self.a(x)).amax(2, keepdim=True)  # (B, 4, 1)
        if self.how == "squeeze()":
            h = h.squeeze()
        elif self.how == "squeeze(1)":
            h = h.squeeze(1)[:, :, 0]  # dim 1 has 4 channels (a no-op) -- but one kept channel would be removed
        elif self.how == "[:, :2]":
            h = h[:, :2, 0]
        elif self.how == "[:, idx]":
            h = h[:, torch.tensor([0, 1, 2, 3])][..., 0]
        else:  # "[:, 0]"
            h = torch.stack([h[:, 0], h[:, 1], h[:, 2], h[:, 3]], 1)[..., 0]
        return self.fc(h)


REFUSED = {
    "squeeze()": "call_method .squeeze() at node 'squeeze': squeeze() without a dim would also remove the pruned "
                 "channel dim once one channel is kept; name the dim(s) to remove, e.g. squeeze(-1)",
    "squeeze(1)": "call_method .squeeze() at node 'squeeze': it squeezes the pruned channel dim 1; squeeze only the "
                  "other dims",
    "[:, :2]": "call_function operator.getitem at node 'getitem': the index [:2] selects along the pruned channel dim "
               "1; index only the other dims",
    "[:, idx]": "call_function operator.getitem at node 'getitem': advanced indexing (a tensor, list or bool index) is "
                "not supported",
    "[:, 0]": "call_function operator.getitem at node 'getitem': the index [0] selects along the pruned channel dim 1; "
              "index only the other dims",
}


@pytest.mark.parametrize("how", REFUSED, ids=REFUSED)
def test_size_one_ops_and_indexing_on_the_channel_dim_are_refused_in_one_line(how):
    torch.manual_seed(0)
    model = Refused(how).eval()
    x = torch.randn(3, 2, 5)
    pruned = {"a.weight": drop_rows(model.a.weight, [1])}
    assert plan_shrink(model, pruned, x).problems == (f"{REFUSED[how]}; exclude 'a.weight' from pruning",)
    with pytest.raises(PrunelabError) as info:
        shrink_model(model, pruned, x)
    assert "\n" not in str(info.value)
    # a barrier only matters where pruned channels reach it: nothing pruned, nothing refused
    kept = {"a.weight": torch.ones_like(model.a.weight, dtype=torch.bool)}
    new = shrink_model(model, kept, x)
    with torch.no_grad():
        assert torch.equal(new(x), model(x))


# --- 2. a wrong example_input: one line for every form, the model untouched -------------------------------
class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 8)

    def forward(self, x):  # (B, 1, 8, 8)
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("form", ["csr", "bsr", "auto", "2:4", "shrink"])
@pytest.mark.parametrize("bad", ["3 channels", "int64"])
def test_a_wrong_example_input_is_one_line_naming_its_shape_for_every_form(form, bad):
    torch.manual_seed(0)
    model = Small().eval()
    masks = {name: torch.rand_like(p) > 0.5 for name, p in model.named_parameters() if name.endswith("weight")}
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 8, 8) if bad == "3 channels" else torch.zeros(2, 1, 8, 8, dtype=torch.int64)
    with pytest.raises(PrunelabError) as info:
        materialise(model, form, masks=masks, example_input=x)
    message = str(info.value)
    assert "\n" not in message
    assert "cannot run example_input" in message and str(tuple(x.shape)) in message
    assert "pass an input the model accepts" in message
    if form != "shrink":  # shrink names the failing node instead (its own trace)
        assert message.startswith(f"materialise {form!r}: the model cannot run example_input of shape "
                                  f"{tuple(x.shape)} ({x.dtype}) (RuntimeError: ")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("form, pooling", [("auto", "native"), ("csr", "auto")])
def test_an_unbatched_example_input_for_timing_says_it_needs_a_batch_dim(form, pooling):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2)).eval()  # runs on one (1, 8, 8) sample
    with pytest.raises(PrunelabError) as info:
        materialise(model, form, example_input=torch.randn(1, 8, 8), pooling=pooling)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"materialise {form!r}: the model cannot run example_input resized to a timing batch "
                              "size, of shape (64, 8, 8) (torch.float32) (RuntimeError: ")
    assert message.endswith("example_input needs a leading batch dimension, e.g. x[:8] of shape (8, C, H, W) rather "
                            "than one unbatched (C, H, W) sample")


def test_a_good_example_input_still_materialises_equal_to_the_masked_model():
    torch.manual_seed(0)
    model = Small().eval()
    masks = {name: torch.rand_like(p) > 0.5 for name, p in model.named_parameters() if name.endswith("weight")}
    x = torch.randn(4, 1, 8, 8)
    new = materialise(model, "csr", masks=masks, example_input=x)
    with torch.no_grad():
        assert torch.allclose(new(x), masked(model, masks)(x), atol=1e-5)
    assert new.materialise_report.max_abs_error <= 1e-5


# --- 3. bench-latency --silence-pruned-channels ---------------------------------------------------------------
@pytest.fixture(scope="module")
def padded_channel_run(tmp_path_factory) -> Path:
    """`prunelab prune` in process: LeNet-5 (padded convs) on digits, l1 channel pruning, 50%, last layer dense."""
    from prunelab.cli import main

    out = tmp_path_factory.mktemp("silence") / "ck"
    assert main(["prune", "--model", "lenet5", "--dataset", "digits", "--method", "oneshot", "--criterion", "l1",
                 "--granularity", "channel", "--allocation", "uniform", "--sparsity", "0.5", "--pretrain-epochs", "1",
                 "--finetune-epochs", "0", "--keep-last", "dense", "--no-progress", "--out", str(out)]) == 0
    return out


def test_bench_latency_shrink_refusal_names_its_own_option_and_the_option_works(padded_channel_run, cli, capsys):
    code, _, err = cli("bench-latency", str(padded_channel_run), "--forms", "shrink", "--batch-sizes", "1",
                       "--reps", "1")
    assert code == 2 and err.count("\n") == 1
    assert "zero-padded conv" in err and "(CLI: bench-latency --silence-pruned-channels; re-check accuracy after)" in err
    assert "materialise --silence" not in err
    code, out, err = cli("bench-latency", str(padded_channel_run), "--forms", "shrink,csr", "--batch-sizes", "1",
                         "--reps", "1", "--silence-pruned-channels")
    assert code == 0, err
    assert "silenced the pruned channels' constant outputs: test accuracy" in out
    header = next(line for line in out.splitlines() if line.startswith("| batch"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["batch", "dense_ms", "shrink_ms", "shrink_speedup_x",
                                                                  "csr_ms", "csr_speedup_x"]
    # materialise keeps naming its own option
    code, _, err = cli("materialise", str(padded_channel_run), "--form", "shrink", "--out",
                       str(padded_channel_run.parent / "no"))
    assert code == 2 and "(CLI: materialise --silence-pruned-channels; re-check accuracy after)" in err


def test_bench_latency_silence_without_shrink_is_refused_before_loading(cli, tmp_path):
    code, _, err = cli("bench-latency", str(tmp_path / "missing"), "--forms", "csr,bsr", "--silence-pruned-channels")
    assert code == 2
    assert err == ("error: --silence-pruned-channels applies to --forms that include shrink only (got --forms "
                   "csr,bsr); the sparse forms keep every channel -- drop the flag\n")
    code, _, err = cli("materialise", str(tmp_path / "missing"), "--form", "bsr", "--out", str(tmp_path / "o"),
                       "--silence-pruned-channels")
    assert code == 2 and err == ("error: --silence-pruned-channels applies to --form shrink only (got --form bsr); "
                                 "the sparse forms keep every channel -- drop the flag\n")


def test_bench_latency_and_materialise_share_one_silence_option(capsys):
    from prunelab.cli import main

    for command in ("bench-latency", "materialise"):
        try:
            main([command, "--help"])
        except SystemExit:
            pass
        assert "--silence-pruned-channels" in capsys.readouterr().out, command


# --- 4. messages for Python and CLI users alike ---------------------------------------------------------------
def test_not_two_four_sparse_names_the_python_argument_and_the_cli_flag():
    with pytest.raises(PrunelabError) as info:
        SemiStructured24.from_dense(torch.tensor([[1.0, 0.0, 2.0, 3.0], [1.0, 0.0, 0.0, 0.0]]), name="fc.weight")
    assert str(info.value) == (
        "layer 'fc.weight' is not 2:4 sparse: row 0, group 0 (columns 0..3) has 3 nonzeros, at most 2 of every 4 are "
        "allowed; prune it with granularity='2:4' first (CLI: --granularity 2:4), or use materialise(model, 'csr', ...) "
        "(CLI: --form csr)")


def test_not_a_neuron_mask_names_the_python_argument_and_the_cli_flag():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, :2] = False  # row 1 keeps 2 of 4 weights: not a neuron mask
    assert plan_shrink(model, {"0.weight": mask}, torch.randn(2, 4)).problems[0] == (
        "mask of '0.weight' is not a neuron mask: row 1 keeps 2 of 4 weights; prune with granularity='channel'/'neuron' "
        "(CLI: --granularity channel/neuron) to shrink, or use materialise(model, 'csr', ...) (CLI: --form csr)")


def test_op_docstring_lists_every_op_kind_the_graph_emits():
    import inspect
    import re

    from prunelab.materialise import graph
    from prunelab.materialise.layouts import Op

    source = inspect.getsource(graph)
    emitted = set(re.findall(r'self\.emit\(node, "([a-z_]+)"', source))
    emitted |= {k for pair in re.findall(r'"([a-z_]+)" if padded else "([a-z_]+)"', source) for k in pair}
    kinds = " ".join(Op.__doc__.split("``kind``:")[1].split("``inputs``")[0].split())
    listed = set(re.findall(r"(?:^|, )([a-z_]+)\b", kinds))  # the names the comma-separated list starts with
    assert {"spatial", "pad", "pool_zero", "barrier", "reshape"} <= emitted
    assert emitted <= listed, sorted(emitted - listed)
