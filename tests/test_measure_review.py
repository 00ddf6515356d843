"""Review of prunelab.measure: hand-computed costs, an independent FLOP reference, energy, fake-clock latency.

The FLOP reference is torch's own ``torch.utils.flop_counter.FlopCounterMode`` (it counts
``2 * MACs`` per conv / matmul / attention op from the op's shapes, independently of
prunelab's hooks).  Latency is tested with a fake clock (``time.perf_counter`` replaced in
``prunelab.measure.latency``), never with real timings.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunelab.errors import PrunelabError
from prunelab.measure import latency, measure_model
from prunelab.measure.energy import ASSUMPTIONS, HOROWITZ_45NM, EnergyTable, estimate_energy
from prunelab.measure.latency import interleaved_latency, layer_latency_ms, model_latency_ms


def _no_hooks(model: nn.Module) -> bool:
    hooks = all(not m._forward_hooks and not m._forward_pre_hooks and not m._forward_hooks_always_called
                for m in model.modules())
    return hooks and not torch.overrides.has_torch_function((torch.zeros(1),))


def _two_layer_net() -> tuple[nn.Sequential, dict[str, torch.Tensor]]:
    """fc1 Linear(4, 3) with bias, ReLU, fc2 Linear(3, 2) without; every weight nonzero; masks keep 5/12 and 4/6."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1.0, 13.0).reshape(3, 4))
        model[0].bias.fill_(0.5)
        model[2].weight.copy_(torch.arange(1.0, 7.0).reshape(2, 3))
    keep1 = torch.zeros(3, 4, dtype=torch.bool)
    keep1.view(-1)[[0, 3, 5, 8, 11]] = True
    keep2 = torch.tensor([[True, False, True], [True, True, False]])
    return model, {"0.weight": keep1, "2.weight": keep2}


# ---------------------------------------------------------------- MACs / FLOPs


def test_two_layer_net_dense_pruned_and_shrunk_counts_by_hand():
    model, masks = _two_layer_net()
    x = torch.randn(1, 4)
    dense = measure_model(model, x)
    fc1, fc2 = dense.layers
    assert (fc1.dense_macs, fc2.dense_macs, dense.dense_macs, dense.dense_flops) == (12, 6, 18, 36)
    assert (fc1.bias_params, fc2.bias_params, dense.params) == (3, 0, 12 + 3 + 6)
    assert dense.sparse_macs == 18  # no mask, no zero: nothing skipped

    pruned = measure_model(model, x, masks)
    fc1, fc2 = pruned.layers
    assert (fc1.sparse_macs, fc2.sparse_macs, pruned.sparse_macs, pruned.sparse_flops) == (5, 4, 9, 18)
    assert pruned.dense_macs == 18 and pruned.nonzeros == 5 + 3 + 4

    # the same net with hidden unit 2 cut out (physically 4 -> 2 -> 2): its smaller shapes are counted
    from prunelab.materialise.shrink import shrink_model

    net = nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False))
    row = torch.tensor([[True] * 4, [True] * 4, [False] * 4])
    with torch.no_grad():
        net[0].weight.mul_(row)
    shrunk = measure_model(shrink_model(net, {"0.weight": row}, x), x)
    assert [l.weight_shape for l in shrunk.layers] == [(2, 4), (2, 2)]
    assert (shrunk.dense_macs, shrunk.params, shrunk.dense_bytes) == (8 + 4, 12, 48)


@pytest.mark.parametrize("layer, shape", [
    (nn.Linear(5, 7), (2, 3, 5)),
    (nn.Linear(5, 7, bias=False), (2, 5)),
    (nn.Conv1d(4, 8, 3, groups=4, stride=2, padding=1, dilation=2), (2, 4, 11)),  # depthwise x2
    (nn.Conv2d(6, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2), (2, 6, 7, 5)),
    (nn.Conv2d(3, 3, 3, groups=3, padding="same", padding_mode="circular"), (2, 3, 5, 5)),
    (nn.Conv3d(2, 4, (3, 2, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2)), (2, 2, 5, 6, 7)),
    (nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (2, 4, 5)),
    (nn.ConvTranspose2d(2, 4, (3, 2), stride=(2, 3), padding=(1, 0), dilation=(1, 2)), (2, 2, 4, 3)),
    (nn.ConvTranspose3d(2, 4, 2, stride=2, groups=2), (2, 2, 2, 3, 3)),
])
def test_dense_flops_match_torch_flop_counter(layer, shape):
    x = torch.randn(*shape)
    with FlopCounterMode(display=False) as reference:
        layer(x)
    cost = measure_model(layer, x)
    assert cost.dense_flops * shape[0] == reference.get_total_flops()  # per sample x batch


def test_conv3d_with_stride_padding_dilation_by_hand():
    # D_out = (5 + 2 - 2 - 1) + 1 = 5, H_out = (6 - 1 - 1) // 2 + 1 = 3, W_out = (7 + 2 - 2 - 1) + 1 = 7
    conv = nn.Conv3d(2, 4, (3, 2, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2))
    (layer,) = measure_model(conv, torch.randn(1, 2, 5, 6, 7)).layers
    assert layer.output_positions == 5 * 3 * 7
    assert layer.dense_macs == 4 * 2 * 3 * 2 * 2 * 105 == 10080


def test_batchnorm_pooling_and_embedding_cost_no_macs_but_their_params_count():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)        # 40 params, a lookup: no MACs
            self.bn = nn.BatchNorm1d(4)           # 8 params
            self.pool = nn.AvgPool1d(2)
            self.fc = nn.Linear(2, 3)             # (1, 4, 2) -> (1, 4, 3): 6 weights x 4 positions

        def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T=4)
            h = self.bn(self.emb(ids).transpose(1, 2))  # (B, 4, T)
            return self.fc(self.pool(h))                # (B, 4, 2) -> (B, 4, 3)

    cost = measure_model(Net(), torch.tensor([[1, 2, 3, 4]]))
    assert [l.name for l in cost.layers] == ["fc"]
    assert cost.dense_macs == 24 and cost.other_params == 48 and cost.params == 48 + 9


def test_cross_attention_products_and_projections_by_hand():
    # E = 6, 3 heads of 2, L = 2 queries, S = 5 keys
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = nn.MultiheadAttention(6, 3, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 7, 6): 2 queries, 5 keys
            return self.att(x[:, :2], x[:, 2:], x[:, 2:])[0]

    cost = measure_model(Cross(), torch.randn(2, 7, 6))
    macs = {l.name: l.dense_macs for l in cost.layers}
    assert macs == {"att.in_proj.q": 36 * 2, "att.in_proj.k": 36 * 5, "att.in_proj.v": 36 * 5, "att.out_proj": 36 * 2}
    (attention,) = cost.attention
    assert attention.macs == 2 * 3 * 2 * 5 * 2 == 120  # Q K^T + A V: heads * L * S * head_dim each
    assert cost.dense_macs_with_attention == 504 + 120


def test_functional_attention_matches_torch_flop_counter():
    class Sdpa(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 6, 7)
            return F.scaled_dot_product_attention(x[..., :4, :5], x[..., :5], x)

    x = torch.randn(2, 3, 6, 7)
    with FlopCounterMode(display=False) as reference:
        Sdpa()(x)
    (attention,) = measure_model(Sdpa(), x).attention
    assert attention.macs == 3 * 4 * 6 * (5 + 7)
    assert 2 * attention.macs * 2 == reference.get_total_flops()


# ---------------------------------------------------------------- bytes


def test_two_layer_net_storage_bytes_by_hand():
    model, masks = _two_layer_net()
    cost = measure_model(model, torch.randn(1, 4), masks)
    fc1, fc2 = cost.layers
    assert (fc1.dense_bytes, fc2.dense_bytes) == (4 * 15, 4 * 6)
    # CSR: 4 B per value + 4 B per int32 column index + 4 B per int32 row pointer (rows + 1), bias dense
    assert fc1.csr_bytes == 5 * 4 + 5 * 4 + 4 * 4 + 3 * 4 == 68
    assert fc2.csr_bytes == 4 * 4 + 4 * 4 + 3 * 4 == 44
    # bitmap: values + ceil(numel / 8) bytes of keep bits
    assert (fc1.bitmap_bytes, fc2.bitmap_bytes) == (20 + 2 + 12, 16 + 1)
    assert (cost.dense_bytes, cost.csr_bytes, cost.best_sparse_bytes) == (84, 112, 51)


def test_semi_structured_and_bsr_format_bytes_by_hand():
    from prunelab.materialise.sparse_modules import BSRLinear, SemiStructuredLinear

    linear = nn.Linear(32, 2)  # 2 rows x 32 columns
    with torch.no_grad():
        linear.weight.copy_(torch.arange(1.0, 65.0).reshape(2, 32))
        linear.weight[:, 0::4] = 0.0
        linear.weight[:, 1::4] = 0.0  # every group of 4 keeps 2: a 2:4 pattern
    x = torch.randn(1, 32)
    semi = measure_model(nn.Sequential(SemiStructuredLinear.from_linear(linear)), x).layers[0]
    # half the values (2 x 16 fp32) + 2-bit positions of the kept values: 16 bits per 16 columns, 2 per row
    assert semi.format_bytes == 2 * 16 * 4 + 2 * 2 * 2 + 2 * 4 == 144
    assert (semi.weight_nonzeros, semi.sparse_macs) == (32, 32)

    blocky = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        blocky.weight.zero_()
        blocky.weight[:2, 2:] = 1.0  # one nonzero 2x2 block of four
    bsr = measure_model(nn.Sequential(BSRLinear.from_linear(blocky, block_size=(2, 2))), torch.randn(1, 4)).layers[0]
    # one 2x2 block of values, one int32 block column, (2 block rows + 1) int32 row pointers
    assert bsr.format_bytes == 4 * 4 + 4 * 1 + 4 * 3 == 32


# ---------------------------------------------------------------- energy


def test_horowitz_table_values_and_mac_energy():
    t = HOROWITZ_45NM
    assert (t.float_add_pj, t.float_mult_pj, t.int_add_pj, t.int_mult_pj) == (0.9, 3.7, 0.1, 3.1)
    assert (t.register_pj, t.sram_pj, t.dram_pj) == (1.0, 5.0, 640.0)
    assert t.mac_pj == pytest.approx(4.6) and "Horowitz" in t.source and "45 nm" in t.source


def test_two_layer_net_energy_by_hand():
    model, masks = _two_layer_net()
    energy = estimate_energy(model, torch.randn(1, 4), masks)
    rows = {(r.layer, r.form): r for r in energy.layers}
    # activations (fp32 words, SRAM 5 pJ): fc1 reads 4 writes 3, fc2 reads 3 writes 2
    assert rows["0", "dense"].activation_bytes == 28 and rows["2", "dense"].activation_bytes == 20
    assert rows["0", "dense"].activation_pj == pytest.approx(35.0) and rows["2", "dense"].activation_pj == 25.0
    dense, pruned, sparse = (energy.total(form) for form in ("dense", "pruned", "sparse"))
    # dense: 18 MACs x 4.6 pJ; (12 + 3 + 6) words x 640 pJ; 12 words x 5 pJ
    assert (dense["macs"], dense["weight_bytes"], dense["activation_bytes"]) == (18, 84, 48)
    assert dense["compute_pj"] == pytest.approx(82.8) and dense["weight_pj"] == pytest.approx(13440.0)
    assert dense["total_pj"] == pytest.approx(82.8 + 13440.0 + 60.0)
    # pruned: 9 MACs; 5 + 3 bias + 4 words fetched
    assert (pruned["macs"], pruned["weight_bytes"]) == (9, 48)
    assert pruned["total_pj"] == pytest.approx(41.4 + 7680.0 + 60.0)
    # sparse: bitmap per layer (34 + 17 bytes)
    assert sparse["weight_bytes"] == 51 and sparse["total_pj"] == pytest.approx(41.4 + 51 / 4 * 640 + 60.0)
    summary = {r["form"]: r for r in energy.summary_rows()}
    assert summary["pruned"]["energy_saving_x"] == pytest.approx(13582.8 / 7781.4)
    assert energy.assumptions == ASSUMPTIONS and "640 pJ" in ASSUMPTIONS and "(5 pJ" in ASSUMPTIONS
    assert energy.to_dict()["assumptions"] == ASSUMPTIONS


def test_energy_assumptions_state_the_table_that_was_used():
    table = EnergyTable(dram_pj=4.0, sram_pj=2.5)
    energy = estimate_energy(nn.Linear(4, 3), torch.randn(1, 4), table=table)
    assert energy.total("dense")["weight_pj"] == pytest.approx(15 * 4.0)
    assert "at 4 pJ per 32-bit word" in energy.assumptions and "(2.5 pJ per 32-bit word)" in energy.assumptions
    assert "640" not in energy.assumptions  # the report must not claim the default DRAM cost


def test_energy_of_a_model_without_countable_layers_is_refused():
    with pytest.raises(PrunelabError, match="no layer to estimate") as err:
        estimate_energy(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), torch.randn(2, 3))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- bad input


class _FlatLinear(nn.Linear):
    """A Linear subclass whose own forward flattens its input: it takes (B, 2, 2) with in_features 4."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(1))


@pytest.mark.parametrize("model, x, layer, expected", [
    (nn.Sequential(nn.Linear(4, 3)), torch.randn(1, 5), "0", r"\(\.\.\., 4\) but got shape \(1, 5\)"),
    (nn.Sequential(nn.Conv2d(2, 3, 3)), torch.randn(1, 3, 5, 5), "0", r"\(N, 2, H, W\) or \(2, H, W\)"),
    (nn.Sequential(nn.Conv2d(2, 3, 3)), torch.randn(2, 5), "0", r"got shape \(2, 5\)"),
    (nn.Sequential(nn.ConvTranspose1d(2, 3, 3)), torch.randn(1, 4, 5), "0", r"\(N, 2, L\)"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(18, 4)), torch.randn(1, 1, 6, 6), "2",
     r"\(\.\.\., 18\) but got shape \(1, 32\)"),
    (nn.Sequential(nn.Linear(4, 3)), torch.ones(1, 4, dtype=torch.long), "0", "floating-point input"),
])
def test_an_input_the_model_cannot_take_is_a_one_line_prunelab_error(model, x, layer, expected):
    model.train()
    for measure in (measure_model, estimate_energy):
        with pytest.raises(PrunelabError, match=expected) as err:
            measure(model, x)
        assert f"layer {layer!r}" in str(err.value) and "\n" not in str(err.value)
        assert _no_hooks(model) and all(m.training for m in model.modules())


def test_a_layer_subclass_with_its_own_forward_is_not_refused():
    cost = measure_model(nn.Sequential(_FlatLinear(4, 3)), torch.randn(2, 2, 2))
    assert cost.dense_macs == 12


def test_batch_zero_and_non_tensor_inputs_are_prunelab_errors():
    with pytest.raises(PrunelabError, match="batch size 0"):
        estimate_energy(nn.Linear(4, 3), torch.randn(0, 4))
    with pytest.raises(PrunelabError, match="leading batch dimension"):
        estimate_energy(nn.Linear(4, 3), torch.tensor(1.0))


# ---------------------------------------------------------------- latency (fake clock)


class _FakeClock:
    """``perf_counter`` returns ``now``; variants advance it by their preset costs; ``tick`` is added per read."""

    def __init__(self, tick: float = 0.0) -> None:
        self.now = 0.0
        self.tick = tick
        self.log: list[str] = []

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now

    def variant(self, name: str, costs: list[float]):
        remaining = list(costs)

        def run() -> None:
            self.log.append(name)
            self.now += remaining.pop(0)
        return run


@pytest.fixture
def clock(monkeypatch):
    fake = _FakeClock()
    monkeypatch.setattr(latency, "time", types.SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


U = 2.0 ** -12  # seconds; multiples of it are exact floats, so the medians are exact


def test_interleaved_latency_exact_medians_warmup_and_order(clock):
    # a: 16U (3.9 ms) per call -> 1 call per sample; b: 4U (0.98 ms) -> int(2e-3 / 4U) + 1 = 3 calls per sample
    a = clock.variant("a", [999.0, 999.0] + [16 * U] + [16 * U, 40 * U, 12 * U])
    b = clock.variant("b", [999.0, 999.0] + [4 * U] + [4 * U] * 3 + [20 * U] * 3 + [8 * U] * 3)
    seconds = interleaved_latency({"a": a, "b": b}, reps=3, warmup=2, min_sample_s=2e-3)
    assert seconds == {"a": 16 * U, "b": 8 * U}  # medians of (16, 40, 12) and (4, 20, 8); warm-up never timed
    warm = ["a", "a", "a", "b", "b", "b"]                  # per variant: 2 warm-up calls, 1 sizing call
    timed = ["a"] + ["b"] * 3 + ["b"] * 3 + ["a"] + ["a"] + ["b"] * 3  # order alternates every repetition
    assert clock.log == warm + timed


def test_interleaved_latency_even_reps_take_the_mean_of_the_middle_two(clock):
    only = clock.variant("x", [32 * U] + [32 * U, 64 * U, 8 * U, 16 * U])
    assert interleaved_latency({"x": only}, reps=4, warmup=0, min_sample_s=0.0) == {"x": 24 * U}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, "2ms", True])
def test_bad_min_sample_s_is_a_prunelab_error(value):
    with pytest.raises(PrunelabError, match="min_sample_s"):
        interleaved_latency({"a": lambda: None}, min_sample_s=value)


class _Recorder(nn.Module):
    """BatchNorm model that records (training, grad enabled, inference mode) on every forward."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.bn = nn.BatchNorm1d(3)
        self.fail = fail
        self.seen: set[tuple[bool, bool, bool]] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.add((self.training, torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        if self.fail:
            raise RuntimeError("boom")
        return self.bn(self.fc(x))


@pytest.mark.parametrize("fail", [False, True])
def test_model_latency_leaves_state_grad_mode_and_threads_as_they_were(monkeypatch, fail):
    fake = _FakeClock(tick=1.0)  # every clock read is 1 s later: one call per sample, no real timing
    monkeypatch.setattr(latency, "time", types.SimpleNamespace(perf_counter=fake.perf_counter))
    model = _Recorder(fail).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    threads = torch.get_num_threads()
    if fail:
        with pytest.raises(RuntimeError, match="boom"):
            model_latency_ms({"m": model}, torch.randn(4, 3), reps=3)
    else:
        assert model_latency_ms({"m": model}, torch.randn(4, 3), reps=3) == {"m": pytest.approx(1000.0)}
    assert model.seen == {(False, False, True)}  # timed in eval mode under inference_mode
    assert all(m.training for m in model.modules()) and torch.is_grad_enabled()
    assert not torch.is_inference_mode_enabled() and torch.get_num_threads() == threads
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # running stats untouched


def test_layer_latency_times_a_leaf_called_with_keywords_with_those_keywords(monkeypatch):
    fake = _FakeClock(tick=1.0)
    monkeypatch.setattr(latency, "time", types.SimpleNamespace(perf_counter=fake.perf_counter))

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.factors: list[float] = []

        def forward(self, x: torch.Tensor, *, factor: float) -> torch.Tensor:
            self.factors.append(factor)
            return x * factor

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.scale = Scale()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.scale(self.fc(x), factor=2.0)

    model = Net()
    layers = layer_latency_ms({"m": model}, torch.randn(2, 3), reps=2)
    assert list(layers) == ["fc", "scale"] and set(layers["scale"]) == {"m"}
    # 1 recording call + 2 warm-up + 1 sizing + 2 repetitions, every one with factor=2.0
    assert model.scale.factors == [2.0] * 6
    assert _no_hooks(model)


def test_a_weight_reparametrised_by_torch_prune_or_parametrize_is_counted_once():
    from torch.nn.utils import parametrize, prune

    class Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    torch.manual_seed(0)
    pruned = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))  # 15 + 8 parameters
    prune.l1_unstructured(pruned[0], "weight", amount=0.5)  # weight_orig (param) + weight_mask (buffer)
    cost = measure_model(pruned, torch.randn(1, 4))
    assert (cost.params, cost.other_params, cost.layers[0].weight_nonzeros) == (23, 0, 6)
    doubled = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    parametrize.register_parametrization(doubled[0], "weight", Double())  # parametrizations.weight.original
    assert (measure_model(doubled, torch.randn(1, 4)).params, measure_model(doubled, torch.randn(1, 4)).other_params) == (23, 0)
