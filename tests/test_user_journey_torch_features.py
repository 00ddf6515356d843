"""User journey: a PyTorch power user trains sparse models with modern torch features and holds
prunelab to its promises (README "Python API"; DESIGN.md "Decisions" 1 and 3): masks live outside
the modules, masked weights stay exactly zero through training (momentum, weight decay, Adam(W),
Adagrad, RMSprop), the Sparsifier state round-trips, and deepcopy / pickle / torch.compile /
torch.export / DDP keep working.

Most tests compare a prunelab run with an independent hand-written reference: the same training
with the mask applied by hand (gradients of pruned weights zeroed before the optimizer step, the
weights re-zeroed after it), i.e. training the sub-network.  For element-wise optimizers that must
give bit-identical weights.  Behaviours that do not hold are strict xfails naming what is wrong.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.utils.checkpoint as checkpoint
from torch import nn
from torch.nn.utils import parametrizations

from prunelab import Cubic, LayerRules, OneShot, PrunelabError, ScoreData, Sparsifier, materialise
from prunelab.dst import RigL, UpdateSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

SPARSITY = 0.75
TOTAL = 16 * 32 + 32 * 4  # prunable weights of _mlp(): 640
KEPT = round((1 - SPARSITY) * TOTAL)  # 160

# every optimizer a user might pick, with the options that touch pruned weights (momentum, decay)
OPTIMIZERS = {
    "sgd-nesterov-wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam-amsgrad-wd": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2, amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1, initial_accumulator_value=0.1, weight_decay=1e-2),
    "rmsprop-centered": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.9, centered=True, weight_decay=1e-2),
}


# --- helpers ---------------------------------------------------------------------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _cnn() -> nn.Module:
    """Unpadded second conv: a channel shrink is exact without silencing (BN shift after ReLU)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x).float(), y)


def _train(model, optimizer, sparsifier, batches, check=None) -> None:
    """The README loop: zero_grad, backward, optimizer.step(), sparsifier.step(); ``check()`` after each step."""
    for x, y in batches:
        optimizer.zero_grad()
        _loss(model, x, y).backward()
        optimizer.step()
        sparsifier.step()
        if check is not None:
            check()


def _hand_mask(model: nn.Module) -> dict[str, torch.Tensor]:
    """Independent uniform magnitude mask: the largest quarter of |w| in each Linear (128 of 512, 32 of 128)."""
    masks = {}
    for name, param in model.named_parameters():
        if name.endswith("weight"):
            scores = param.detach().abs().flatten()  # (out * in,)
            threshold = scores.topk(round((1 - SPARSITY) * scores.numel())).values.min()
            masks[name] = param.detach().abs() >= threshold
    return masks


def _oneshot(model: nn.Module) -> Sparsifier:
    return Sparsifier(model, allocation="uniform", schedule=OneShot(SPARSITY))


def _train_subnetwork(model, optimizer, masks, batches, clip=None) -> None:
    """Reference: train the sub-network by hand (pruned grads zeroed before the step, weights after)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m)
    for x, y in batches:
        optimizer.zero_grad()
        _loss(model, x, y).backward()
        for n, m in masks.items():
            params[n].grad.mul_(m)
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        with torch.no_grad():
            for n, m in masks.items():
                params[n].mul_(m)


def _pruned_nonzeros(sparsifier: Sparsifier) -> int:
    """Pruned weights that are not exactly zero."""
    return sum(int((p[~sparsifier.masks[n]] != 0).sum()) for n, p in sparsifier.params.items())


def _pruned_state_nonzeros(sparsifier: Sparsifier, optimizer: torch.optim.Optimizer) -> int:
    """Nonzero optimizer-state entries (momentum, Adam moments, Adagrad sums, ...) of pruned weights."""
    count = 0
    for n, p in sparsifier.params.items():
        for value in optimizer.state.get(p, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                count += int((value[~sparsifier.masks[n]] != 0).sum())
    return count


def _kept(sparsifier: Sparsifier) -> dict[str, int]:
    return {n: int(m.sum()) for n, m in sparsifier.masks.items()}


def _same_params(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


# --- optimizers: a fixed mask trains exactly the sub-network ---------------------------------------
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_oneshot_mask_under_every_optimizer_trains_exactly_the_subnetwork(opt):
    model, reference = _mlp(), _mlp()
    optimizer = OPTIMIZERS[opt](model.parameters())
    sparsifier = _oneshot(model).prepare(optimizer)
    hand = _hand_mask(reference)
    assert _kept(sparsifier) == {"0.weight": 128, "2.weight": 32}
    assert all(torch.equal(sparsifier.masks[n], hand[n]) for n in hand)
    state_leaks = []
    _train(model, optimizer, sparsifier, _batches(25),
           check=lambda: state_leaks.append(_pruned_nonzeros(sparsifier) + _pruned_state_nonzeros(sparsifier, optimizer)))
    _train_subnetwork(reference, OPTIMIZERS[opt](reference.parameters()), hand, _batches(25))
    assert state_leaks == [0] * 25  # weights and optimizer state of pruned entries exactly 0 after every step
    assert _same_params(model, reference)  # bit-identical to training the sub-network


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_pruned_entries_are_inert_an_optimizer_step_alone_does_not_resurrect_them(opt):
    """After sparsifier.step() the pruned entries' state is zero, so a step whose gradient is zero
    there moves nothing there -- even without enforce (no stale momentum / Adam moment / decay)."""
    model = _mlp()
    optimizer = OPTIMIZERS[opt](model.parameters())
    sparsifier = _oneshot(model).prepare(optimizer)
    _train(model, optimizer, sparsifier, _batches(10))
    x, y = _batches(1, seed=7)[0]
    optimizer.zero_grad()
    _loss(model, x, y).backward()
    for n, p in sparsifier.params.items():
        p.grad.masked_fill_(~sparsifier.masks[n], 0)
    optimizer.step()  # no sparsifier.step() after it
    assert _pruned_nonzeros(sparsifier) == 0


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("method", ["cubic", "rigl"])
def test_gradual_and_rigl_keep_pruned_weights_and_state_exactly_zero(opt, method):
    model = _mlp()
    optimizer = OPTIMIZERS[opt](model.parameters())
    if method == "cubic":
        sparsifier = Sparsifier(model, schedule=Cubic(SPARSITY, num_updates=4, frequency=5))
    else:
        sparsifier = RigL(model, SPARSITY, schedule=UpdateSchedule(end_step=20, delta_t=5), seed=2)
    sparsifier.prepare(optimizer)
    start, counts, leaks = dict(sparsifier.masks), [], []

    def check():
        counts.append(_kept(sparsifier))
        leaks.append(_pruned_nonzeros(sparsifier) + _pruned_state_nonzeros(sparsifier, optimizer))

    _train(model, optimizer, sparsifier, _batches(30), check)
    assert leaks == [0] * 30
    if method == "cubic":
        assert [h["step"] for h in sparsifier.history] == [5, 10, 15, 20]
        assert sum(counts[-1].values()) == KEPT
    else:  # RigL keeps every layer's count and really rewires
        assert all(c == counts[0] for c in counts)
        assert sum(counts[0].values()) in (KEPT - 1, KEPT, KEPT + 1)  # ERK rounds once per layer
        assert [h["step"] for h in sparsifier.history] == [0, 5, 10, 15]  # the step-0 random draw, then rewires
        assert any(not torch.equal(start[n], sparsifier.masks[n]) for n in start)


# --- what leaks through the dense gradient of pruned weights --------------------------------------
# Between backward() and sparsifier.step() a pruned weight still holds its dense gradient (RigL needs it).
# Element-wise optimizers only use it on the pruned entry itself (re-zeroed), but a gradient norm or a
# matrix-wise update mixes it into the kept weights: the model then trains unlike its sub-network.
LEAKY = {
    "clip_grad_norm": (lambda ps: torch.optim.SGD(ps, lr=0.5), 0.1),
    "muon": (lambda ps: torch.optim.Muon([p for p in ps if p.dim() == 2], lr=0.05), None),
    "adafactor": (lambda ps: torch.optim.Adafactor(ps, lr=0.05), None),
}


def _leaky_run(case: str, mask_gradients: bool) -> tuple[float, Sparsifier]:
    """The README loop with clipping / Muon / Adafactor; the largest distance to the hand-trained sub-network."""
    make, clip = LEAKY[case]
    model, reference = _mlp(), _mlp()
    optimizer = make(list(model.parameters()))
    sparsifier = _oneshot(model).prepare(optimizer)
    for x, y in _batches(20):
        optimizer.zero_grad()
        _loss(model, x, y).backward()
        if mask_gradients:
            sparsifier.mask_gradients_()  # the opt-in: masked gradients are zero before anything reads them
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        sparsifier.step()
    _train_subnetwork(reference, make(list(reference.parameters())), _hand_mask(reference),
                      _batches(20), clip=clip)
    gap = max(float((a - b).detach().abs().max()) for a, b in zip(model.parameters(), reference.parameters()))
    return gap, sparsifier


@pytest.mark.parametrize("case", list(LEAKY))
def test_by_default_non_elementwise_gradient_use_lets_pruned_gradients_move_kept_weights(case):
    """The default loop (no mask_gradients_): the pruned weights stay zero, but their dense gradients
    enter the gradient norm / Muon's orthogonalisation / Adafactor's factored moment."""
    gap, sparsifier = _leaky_run(case, mask_gradients=False)
    assert _pruned_nonzeros(sparsifier) == 0
    assert gap > 1e-3  # clip ~1e-2, Muon ~0.25, Adafactor ~7e-2 from the sub-network


@pytest.mark.parametrize("case", list(LEAKY))
def test_mask_gradients_opt_in_trains_exactly_the_subnetwork_under_non_elementwise_gradient_use(case):
    gap, sparsifier = _leaky_run(case, mask_gradients=True)
    assert _pruned_nonzeros(sparsifier) == 0
    assert gap <= 1e-6


def test_mask_gradients_zeroes_only_the_pruned_entries_of_grad():
    model = _mlp()
    sparsifier = _oneshot(model).prepare()
    x, y = _batches(1)[0]
    _loss(model, x, y).backward()
    dense = {n: p.grad.clone() for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparsifier.mask_gradients_()
    for n, p in model.named_parameters():
        mask = sparsifier.masks[n] if n in sparsifier.masks else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(p.grad, torch.where(mask, dense[n], torch.zeros_like(dense[n])))  # biases untouched
        assert torch.equal(p.detach(), weights[n])


def _dst_run(method: str, mask_gradients: bool):
    from prunelab.dst import SNFS

    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    build = RigL if method == "rigl" else SNFS
    sparsifier = build(model, SPARSITY, schedule=UpdateSchedule(end_step=16, delta_t=4), seed=3).prepare(optimizer)
    for i, (x, y) in enumerate(_batches(24)):  # k = 2 micro-batches per optimizer step: 12 steps, updates at 4, 8, 12
        _loss(model, x, y).div(2).backward()
        if mask_gradients:
            sparsifier.mask_gradients_()  # after every micro-batch: the removed parts add up
        if i % 2 == 1:
            optimizer.step()
            sparsifier.step()
            optimizer.zero_grad()
    return model, sparsifier


@pytest.mark.parametrize("method", ["rigl", "snfs"])
def test_mask_gradients_keeps_the_dense_gradient_dst_grows_by(method):
    """RigL grows by |dense grad|, SNFS by its momentum: with mask_gradients_ (called per micro-batch)
    the same connections are grown and, with an element-wise optimizer, the weights are bit-identical."""
    plain, plain_sp = _dst_run(method, mask_gradients=False)
    masked, masked_sp = _dst_run(method, mask_gradients=True)
    assert [h["step"] for h in masked_sp.history] == [0, 4, 8, 12]
    assert masked_sp.history == plain_sp.history
    assert all(torch.equal(masked_sp.masks[n], plain_sp.masks[n]) for n in plain_sp.masks)
    assert _same_params(masked, plain)
    assert masked_sp._removed_grads == {}  # nothing kept past its step


def test_enforce_before_clipping_is_the_workaround_that_clips_the_subnetwork_gradient():
    model, reference = _mlp(), _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    sparsifier = _oneshot(model).prepare(optimizer)
    for x, y in _batches(20):
        optimizer.zero_grad()
        _loss(model, x, y).backward()
        sparsifier.enforce()  # zeroes the pruned weights' .grad too
        nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        sparsifier.step()
    _train_subnetwork(reference, torch.optim.SGD(reference.parameters(), lr=0.5), _hand_mask(reference),
                      _batches(20), clip=0.1)
    assert _same_params(model, reference)


# --- mixed precision, accumulation, clipping, LR schedules, dtype / memory-format moves ------------
def test_bf16_autocast_with_gradient_accumulation_trains_exactly_the_subnetwork():
    model, reference = _mlp(), _mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sparsifier = _oneshot(model).prepare(optimizer)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    hand = _hand_mask(reference)
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for n, m in hand.items():
            params[n].mul_(m)
    for i, (x, y) in enumerate(_batches(24)):  # k = 3 micro-batches per optimizer step
        for net in (model, reference):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = net(x)  # (8, 4) bf16
            (nn.functional.cross_entropy(out.float(), y) / 3).backward()
        if i % 3 == 2:
            optimizer.step()
            sparsifier.step()
            optimizer.zero_grad()
            for n, m in hand.items():
                params[n].grad.mul_(m)
            ref_opt.step()
            ref_opt.zero_grad()
            with torch.no_grad():
                for n, m in hand.items():
                    params[n].mul_(m)
    assert out.dtype == torch.bfloat16 and sparsifier.step_count == 8
    assert _pruned_nonzeros(sparsifier) == 0
    assert _same_params(model, reference)


@pytest.mark.parametrize("method", ["cubic", "rigl"])
def test_autocast_accumulation_clipping_and_onecycle_count_optimizer_steps(method):
    model = _mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=20)
    if method == "cubic":
        sparsifier = Sparsifier(model, schedule=Cubic(SPARSITY, num_updates=3, frequency=4))
    else:
        sparsifier = RigL(model, SPARSITY, schedule=UpdateSchedule(end_step=15, delta_t=3))
    sparsifier.prepare(optimizer)
    for i, (x, y) in enumerate(_batches(40)):  # k = 2: 20 optimizer steps
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x).float(), y) / 2
        loss.backward()
        if i % 2 == 1:
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
            sparsifier.step()  # before zero_grad: RigL reads the dense gradient
            lr_schedule.step()
            optimizer.zero_grad()
    assert sparsifier.step_count == 20 and _pruned_nonzeros(sparsifier) == 0
    expected = [4, 8, 12] if method == "cubic" else [0, 3, 6, 9, 12]  # RigL's history starts with its step-0 draw
    assert [h["step"] for h in sparsifier.history] == expected
    assert abs(sum(_kept(sparsifier).values()) - KEPT) <= 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_model_dtype_change_after_prepare_keeps_the_masks_enforced(dtype):
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = Sparsifier(model, schedule=Cubic(0.6, num_updates=3, frequency=3)).prepare(optimizer)
    before = [id(p) for p in model.parameters()]
    model.to(dtype)
    assert [id(p) for p in model.parameters()] == before  # .to() keeps the Parameter objects the sparsifier holds
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 16, generator=g, dtype=dtype), torch.randint(0, 4, (8,), generator=g)) for _ in range(12)]
    _train(model, optimizer, sparsifier, batches)
    assert model[0].weight.dtype == dtype and sparsifier.masks["0.weight"].dtype == torch.bool
    assert _pruned_nonzeros(sparsifier) == 0 and _pruned_state_nonzeros(sparsifier, optimizer) == 0
    assert sum(_kept(sparsifier).values()) == round(0.4 * TOTAL)  # 256 of 640


def test_channels_last_cnn_trains_with_zeros_and_keeps_its_memory_format():
    model = _cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sparsifier = Sparsifier(model, schedule=Cubic(0.6, num_updates=3, frequency=3)).prepare(optimizer)
    model.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        x = torch.randn(4, 3, 8, 8, generator=g).to(memory_format=torch.channels_last)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), torch.randint(0, 5, (4,), generator=g)).backward()
        optimizer.step()
        sparsifier.step()
    assert _pruned_nonzeros(sparsifier) == 0 and _pruned_state_nonzeros(sparsifier, optimizer) == 0
    assert model[3].weight.is_contiguous(memory_format=torch.channels_last)
    assert optimizer.state[model[3].weight]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    total = sum(p.numel() for p in sparsifier.params.values())  # 216 + 576 + 40
    assert abs(sum(_kept(sparsifier).values()) - round(0.4 * total)) <= 1


def _shrunk_cnn(memory_format=torch.contiguous_format):
    model = _cnn()
    masks = Sparsifier(model, granularity="channel", allocation="uniform", rules=LayerRules(keep_last="dense"),
                       schedule=OneShot(0.5)).prepare().finalize()
    model.eval().to(memory_format=memory_format)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5)).to(memory_format=memory_format)
    return model, materialise(model, "shrink", masks=masks, example_input=x), x


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"])
def test_shrunk_cnn_keeps_the_memory_format_of_its_conv_weights(memory_format):
    model, small, x = _shrunk_cnn(memory_format)
    torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-6)  # exact
    # uniform 50% with the Linear (40 weights) dense: the convs keep 4 of 8 (108 of 216) and 3 of 8 (216 of 576)
    assert (small[0].out_channels, small[3].in_channels, small[3].out_channels, small[7].in_features) == (4, 4, 3, 3)
    for conv in (small[0], small[3]):  # both cut (rows, and for 3 columns too)
        assert conv.weight.is_contiguous(memory_format=memory_format)
        assert conv.weight.is_contiguous() == (memory_format == torch.contiguous_format)


def test_shrunk_conv3d_stays_channels_last_3d():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 8, 2), nn.ReLU(), nn.Conv3d(8, 2, 2))  # 128 + 128 weights
    masks = Sparsifier(model, granularity="channel", allocation="uniform", rules=LayerRules(keep_last="dense"),
                       schedule=OneShot(0.25)).prepare().finalize()
    model.eval().to(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 2, 4, 4, 4, generator=torch.Generator().manual_seed(1)).to(memory_format=torch.channels_last_3d)
    small = materialise(model, "shrink", masks=masks, example_input=x)
    # keep 192 of 256 with the last conv dense: the first keeps 64 of its 128 weights, 4 of its 8 channels
    assert small[0].out_channels == small[2].in_channels == int(masks["0.weight"].flatten(1).any(dim=1).sum()) == 4
    torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-6)
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last_3d) and not c.weight.is_contiguous()
               for c in (small[0], small[2]))


# --- optimizer state of regrown connections --------------------------------------------------------
# what torch.optim starts a fresh parameter's state at (torch/optim/adagrad.py, rprop.py, adam.py)
FRESH = {
    "adagrad": (lambda ps: torch.optim.Adagrad(ps, lr=0.1, initial_accumulator_value=0.1), {"sum": 0.1}),
    "rprop": (lambda ps: torch.optim.Rprop(ps, lr=0.01), {"step_size": 0.01, "prev": 0.0}),
    "adam": (lambda ps: torch.optim.Adam(ps, lr=1e-2), {"exp_avg": 0.0, "exp_avg_sq": 0.0}),
    "sgd-momentum": (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), {"momentum_buffer": 0.0}),
}


def _rigl_first_rewire(opt: str):
    """RigL to its first update (step 4): (model, optimizer, sparsifier, mask before, new connections)."""
    model = _mlp()
    optimizer = FRESH[opt][0](model.parameters())
    sparsifier = RigL(model, SPARSITY, schedule=UpdateSchedule(end_step=12, delta_t=4), seed=1).prepare(optimizer)
    batches = _batches(5)
    _train(model, optimizer, sparsifier, batches[:3])
    before = dict(sparsifier.masks)
    _train(model, optimizer, sparsifier, batches[3:4])
    fresh = {n: sparsifier.masks[n] & ~before[n] for n in before}
    assert sparsifier.history[-1]["step"] == 4 and sum(int(f.sum()) for f in fresh.values()) > 0
    return model, optimizer, sparsifier, before, fresh


@pytest.mark.parametrize("opt", list(FRESH))
def test_rigl_regrown_connections_start_with_the_optimizers_fresh_state(opt):
    model, optimizer, sparsifier, before, fresh = _rigl_first_rewire(opt)
    for n, p in sparsifier.params.items():
        state = optimizer.state[p]
        for key, start in FRESH[opt][1].items():
            value = state[key]
            assert torch.equal(value[fresh[n]], torch.full_like(value[fresh[n]], start))  # was 0 for Adagrad / Rprop
            assert int((value[~sparsifier.masks[n]] != 0).sum()) == 0  # pruned entries stay inert
    assert _pruned_nonzeros(sparsifier) == 0


def test_adagrad_first_step_of_a_regrown_weight_is_a_fresh_adagrad_step():
    """w = 0 - lr * g / (sqrt(G_0 + g^2) + eps) with G_0 = initial_accumulator_value (Duchi et al. 2011)."""
    model, optimizer, sparsifier, before, fresh = _rigl_first_rewire("adagrad")
    x, y = _batches(5)[4]
    optimizer.zero_grad()
    _loss(model, x, y).backward()
    optimizer.step()
    for n, p in sparsifier.params.items():
        g = p.grad[fresh[n]]
        expected = -0.1 * g / (torch.sqrt(0.1 + g * g) + 1e-10)
        torch.testing.assert_close(p.detach()[fresh[n]], expected, rtol=1e-6, atol=0)


# --- gradient checkpointing ------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


class _CheckpointedMLP(nn.Module):
    def __init__(self, use_checkpoint: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(16, 32), _Block(), nn.Linear(32, 4)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))  # (B, 32)
        h = checkpoint.checkpoint(self.b, h, use_reentrant=False) if self.use_checkpoint else self.b(h)
        return self.c(h)  # (B, 4)


def test_gradient_checkpointing_trains_like_the_plain_model_with_a_gradient_criterion():
    runs = []
    for use_checkpoint in (True, False):
        model = _CheckpointedMLP(use_checkpoint)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sparsifier = Sparsifier(model, criterion="taylor", data=ScoreData(_batches(2, seed=9)),
                                schedule=Cubic(0.6, num_updates=2, frequency=3)).prepare(optimizer)
        _train(model, optimizer, sparsifier, _batches(10))
        runs.append((model, sparsifier))
    (ck, ck_sp), (plain, plain_sp) = runs
    assert all(torch.equal(ck_sp.masks[n], plain_sp.masks[n]) for n in plain_sp.masks)
    assert _same_params(ck, plain) and _pruned_nonzeros(ck_sp) == 0


def test_gradient_checkpointed_model_shrinks_exactly():
    model = _CheckpointedMLP(True)
    masks = Sparsifier(model, granularity="neuron", allocation="uniform", rules=LayerRules(keep_last="dense"),
                       schedule=OneShot(0.5)).prepare().finalize()
    model.eval()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(4))
    small = materialise(model, "shrink", masks=masks, example_input=x)
    kept_a, kept_b = (int(masks[n].any(dim=1).sum()) for n in ("a.weight", "b.fc.weight"))  # neurons kept
    assert (kept_a, kept_b) == (15, 14)  # c kept dense, so a and b lose more than half of their 32 neurons
    assert (small.a.out_features, small.b.fc.in_features, small.b.fc.out_features) == (kept_a, kept_a, kept_b)
    torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-6)


# --- a tiny nn.TransformerEncoder ------------------------------------------------------------------
def test_transformer_encoder_sparse_training_prunes_in_proj_and_eval_fast_path_agrees():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-2, weight_decay=0.1)
    sparsifier = Sparsifier(encoder, schedule=Cubic(0.5, num_updates=2, frequency=3)).prepare(optimizer)
    assert "layers.1.self_attn.in_proj_weight" in sparsifier.params  # (24, 8): q, k and v projections
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        optimizer.zero_grad()
        encoder(torch.randn(3, 5, 8, generator=g)).pow(2).mean().backward()
        optimizer.step()
        sparsifier.step()
    assert _pruned_nonzeros(sparsifier) == 0 and _pruned_state_nonzeros(sparsifier, optimizer) == 0
    assert sum(_kept(sparsifier).values()) == 512  # half of 2 layers x (192 in_proj + 64 out_proj + 128 + 128)
    x = torch.randn(3, 5, 8, generator=g)
    slow = encoder(x)  # training mode: the math path
    encoder.eval()
    with torch.no_grad():
        fast = encoder(x)  # eval + no_grad: torch's fused fast path reads in_proj_weight directly
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)


# --- torch.compile (three tiny compiles), torch.export, torch.jit.trace ----------------------------
def test_torch_compile_during_gradual_training_equals_eager_training():
    runs = []
    for compiled in (False, True):
        model = _mlp()
        net = torch.compile(model) if compiled else model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sparsifier = Sparsifier(net, schedule=Cubic(SPARSITY, num_updates=3, frequency=4)).prepare(optimizer)
        _train(net, optimizer, sparsifier, _batches(16))
        runs.append((model, net, sparsifier))
    (eager, _, eager_sp), (plain, net, sp) = runs
    assert list(sp.masks) == ["0.weight", "2.weight"]  # the plain model's names, not '_orig_mod.0.weight'
    assert all(torch.equal(sp.masks[n], eager_sp.masks[n]) for n in sp.masks)
    assert _pruned_nonzeros(sp) == 0 and sum(_kept(sp).values()) == KEPT
    torch.testing.assert_close(plain.state_dict(), eager.state_dict(), rtol=0, atol=1e-6)
    x = _batches(1, seed=11)[0][0]
    torch.testing.assert_close(net(x), plain(x), rtol=0, atol=1e-6)


def test_shrunk_cnn_under_torch_export_and_jit_trace_equals_eager():
    model, small, x = _shrunk_cnn()
    ref = small(x)  # (2, 5)
    torch.testing.assert_close(ref, model(x), rtol=0, atol=1e-6)
    assert torch.equal(torch.jit.trace(small, x)(x), ref)
    exported = torch.export.export(small, (x,))
    torch.testing.assert_close(exported.module()(x), ref, rtol=0, atol=1e-6)


def test_torch_compile_of_a_neuron_shrunk_mlp_equals_eager():
    model = _mlp()
    masks = Sparsifier(model, granularity="neuron", rules=LayerRules(keep_last="dense"),
                       schedule=OneShot(0.5)).prepare().finalize()
    model.eval()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    small = materialise(model, "shrink", masks=masks, example_input=x)
    assert small[0].out_features == int(masks["0.weight"].any(dim=1).sum()) < 32
    torch.testing.assert_close(torch.compile(small)(x), model(x), rtol=0, atol=1e-6)


def _csr_mlp() -> tuple[nn.Module, torch.Tensor, nn.Module]:
    """``(masked MLP in eval mode, inputs, its CSR-materialised form)``."""
    model = _mlp()
    masks = _oneshot(model).prepare().finalize()
    model.eval()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    return model, x, materialise(model, "csr", masks=masks, example_input=x)


def test_torch_compile_of_a_csr_materialised_mlp_equals_eager():
    model, x, sparse = _csr_mlp()
    assert type(sparse[0]).__name__ == "CSRLinear"
    torch.testing.assert_close(torch.compile(sparse)(x), model(x), rtol=0, atol=1e-6)


def test_torch_export_and_jit_trace_of_a_csr_materialised_mlp_fail_inside_torch():
    # the README's stated limit (torch 2.13): sparse CSR tensors have no strides for export, no value kind for
    # the tracer; when a torch release lifts it this test fails and the README line can go
    _, x, sparse = _csr_mlp()
    with pytest.raises(RuntimeError, match="do not have strides"):
        torch.export.export(sparse, (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated
        with pytest.raises(RuntimeError):
            torch.jit.trace(sparse, (x,))


# --- parametrizations already on a module ----------------------------------------------------------
@pytest.mark.parametrize("wrap", [parametrizations.weight_norm, parametrizations.spectral_norm,
                                  torch.nn.utils.weight_norm], ids=["weight_norm", "spectral_norm", "old_weight_norm"])
def test_parametrized_layer_is_refused_in_one_line_and_excluding_it_works(wrap):
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        wrap(model[0])
    with pytest.raises(PrunelabError) as err:
        Sparsifier(model, schedule=OneShot(0.5))
    message = str(err.value)
    assert "\n" not in message and message.startswith("0.weight is not a plain initialised nn.Parameter")
    assert "parametrization" in message and "exclude '0'" in message
    sparsifier = Sparsifier(model, exclude=["0"], schedule=OneShot(0.5)).prepare()
    assert list(sparsifier.masks) == ["2.weight"] and _kept(sparsifier) == {"2.weight": 64}


# --- deepcopy, pickle, torch.save of the state mid-training ----------------------------------------
def _gradual(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return optimizer, Sparsifier(model, schedule=Cubic(0.8, num_updates=5, frequency=4, start_step=2))


def _rigl(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    return optimizer, RigL(model, 0.8, schedule=UpdateSchedule(end_step=25, delta_t=4), seed=1)


def _resume(how, build, model, optimizer, sparsifier):
    """A second (model, optimizer, sparsifier) continuing from the first's state, by ``how``."""
    if how == "deepcopy":
        return copy.deepcopy((model, optimizer, sparsifier))
    if how == "pickle":
        return pickle.loads(pickle.dumps((model, optimizer, sparsifier)))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": optimizer.state_dict(), "sp": sparsifier.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)  # torch's default weights_only=True: the sparsifier state is plain data
    model2 = _mlp()
    model2.load_state_dict(saved["model"])  # a plain state_dict into an unpruned model
    optimizer2, sparsifier2 = build(model2)
    optimizer2.load_state_dict(saved["opt"])
    sparsifier2.load_state_dict(saved["sp"])  # the documented order: build, load_state_dict, prepare
    return model2, optimizer2, sparsifier2.prepare(optimizer2)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch_save_state_dicts"])
@pytest.mark.parametrize("build", [_gradual, _rigl], ids=["cubic-adamw", "rigl-sgd"])
def test_interrupted_training_resumes_to_the_same_weights_as_uninterrupted(how, build):
    batches = _batches(30)
    model = _mlp()
    optimizer, sparsifier = build(model)
    sparsifier.prepare(optimizer)
    _train(model, optimizer, sparsifier, batches[:9])
    model2, optimizer2, sparsifier2 = _resume(how, build, model, optimizer, sparsifier)
    _train(model, optimizer, sparsifier, batches[9:])
    _train(model2, optimizer2, sparsifier2, batches[9:])
    assert len(sparsifier.history) >= 5  # mask updates happened after the interruption too
    assert sparsifier2.history == sparsifier.history and sparsifier2.step_count == 30
    assert all(torch.equal(sparsifier.masks[n], sparsifier2.masks[n]) for n in sparsifier.masks)
    assert _same_params(model, model2)


# --- DDP (world size 1, gloo, in this process) -----------------------------------------------------
@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_sparsifier_on_the_model_then_ddp_wrapper_trains_exactly_the_subnetwork(process_group):
    model, reference = _mlp(), _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    sparsifier = _oneshot(model).prepare(optimizer)
    ddp = nn.parallel.DistributedDataParallel(model)
    _train(ddp, optimizer, sparsifier, _batches(10))
    _train_subnetwork(reference, torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2),
                      _hand_mask(reference), _batches(10))
    masks = sparsifier.finalize()  # verifies the masks across ranks
    assert list(masks) == ["0.weight", "2.weight"]
    assert _same_params(model, reference)


def test_sparsifier_built_on_a_ddp_wrapper_names_masks_like_the_plain_model(process_group):
    ddp = nn.parallel.DistributedDataParallel(_mlp())
    sparsifier = Sparsifier(ddp, allocation="uniform", schedule=OneShot(SPARSITY))
    masks = sparsifier.prepare().finalize()
    assert list(masks) == ["0.weight", "2.weight"] and sparsifier.model is ddp.module
    hand = _hand_mask(_mlp())
    assert all(torch.equal(masks[n], hand[n]) for n in hand)
    plain = _mlp()
    masks.apply_(plain)  # the masks fit the unwrapped model
    assert _same_params(plain, ddp.module)


def test_sparsifier_built_on_a_data_parallel_wrapper_names_masks_like_the_plain_model():
    wrapped = nn.DataParallel(nn.DataParallel(_mlp()))  # nested wrappers are unwrapped too
    sparsifier = RigL(wrapped, SPARSITY, seed=0).prepare()
    assert list(sparsifier.masks) == ["0.weight", "2.weight"] and sparsifier.model is wrapped.module.module


# --- parameters replaced after the Sparsifier was built -------------------------------------------
def test_sparsifier_built_on_meta_works_after_the_model_is_materialised():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    sparsifier = _oneshot(model)
    sparsifier.check_target(SPARSITY)  # documented to work on meta parameters
    with pytest.raises(PrunelabError, match="is on the meta device and holds no values"):
        sparsifier.update(SPARSITY)  # still meta: refused
    model.to_empty(device="cpu")
    model.load_state_dict(_mlp().state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier.prepare(optimizer)
    assert sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("weight")) == TOTAL - KEPT
    hand = _hand_mask(_mlp())
    assert all(torch.equal(sparsifier.masks[n], hand[n]) and sparsifier.masks[n].device.type == "cpu" for n in hand)
    assert all(sparsifier.params[n] is model.get_parameter(n) for n in hand)
    _train(model, optimizer, sparsifier, _batches(3))
    assert _pruned_nonzeros(sparsifier) == 0 and _pruned_state_nonzeros(sparsifier, optimizer) == 0


def test_rigl_built_on_meta_draws_its_mask_after_the_model_is_materialised():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    sparsifier = RigL(model, SPARSITY, schedule=UpdateSchedule(end_step=8, delta_t=2), seed=2)
    model.to_empty(device="cpu")
    model.load_state_dict(_mlp().state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier.prepare(optimizer)
    reference = RigL(_mlp(), SPARSITY, schedule=UpdateSchedule(end_step=8, delta_t=2), seed=2).prepare()
    assert all(torch.equal(sparsifier.masks[n], reference.masks[n]) for n in reference.masks)
    _train(model, optimizer, sparsifier, _batches(6))
    assert [h["step"] for h in sparsifier.history] == [0, 2, 4, 6] and _pruned_nonzeros(sparsifier) == 0


def test_masks_set_on_a_meta_model_keep_their_values_until_it_is_materialised():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    hand = _hand_mask(_mlp())
    sparsifier = Sparsifier(model)
    sparsifier.set_masks(hand)  # e.g. a resumed state, before the weights exist
    assert all(sparsifier.masks[n].device.type == "meta" for n in hand)  # on the parameters' device
    assert all(torch.equal(sparsifier.state_dict()["masks"][n], hand[n]) for n in hand)  # the values are kept
    model.to_empty(device="cpu")
    model.load_state_dict(_mlp().state_dict())
    sparsifier.prepare()
    assert all(torch.equal(sparsifier.masks[n], hand[n]) for n in hand)
    assert sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("weight")) == TOTAL - KEPT
    with pytest.raises(PrunelabError, match="mask '0.weight' is on the meta device"):
        sparsifier.set_masks({n: m.to("meta") for n, m in hand.items()})


def test_load_state_dict_with_assign_keeps_the_masks_on_the_live_weights():
    model = _mlp()
    sparsifier = _oneshot(model).prepare()
    dense = {k: v.clone() for k, v in _mlp().state_dict().items()}
    model.load_state_dict(dense, assign=True)  # the torch >= 2.1 way to load without a copy
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier.prepare(optimizer)
    _train(model, optimizer, sparsifier, _batches(3))
    live = dict(model.named_parameters())
    assert sum(int((live[n][~m] != 0).sum()) for n, m in sparsifier.masks.items()) == 0  # was: 480 nonzero
    assert _pruned_state_nonzeros(sparsifier, optimizer) == 0


def test_parameters_replaced_mid_training_are_rebound_at_the_next_step():
    model = _mlp()
    sparsifier = _oneshot(model).prepare()  # no optimizer attached
    hand = _hand_mask(_mlp())
    model.load_state_dict({k: v.clone() for k, v in _mlp().state_dict().items()}, assign=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _train(model, optimizer, sparsifier, _batches(2))  # step() alone notices the new Parameters
    assert all(sparsifier.params[n] is model.get_parameter(n) for n in hand)
    assert all(torch.equal(model.get_parameter(n) != 0, hand[n] & (model.get_parameter(n) != 0)) for n in hand)
    assert _pruned_nonzeros(sparsifier) == 0


def test_an_attached_optimizer_training_replaced_parameters_is_refused_in_one_line():
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = _oneshot(model).prepare(optimizer)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    x, y = _batches(1)[0]
    _loss(model, x, y).backward()
    optimizer.step()  # moves the old Parameters only: the model's weights do not train
    with pytest.raises(PrunelabError) as err:
        sparsifier.step()
    message = str(err.value)
    assert "\n" not in message and message.startswith("'0.weight' was replaced by a new Parameter")
    assert "sparsifier.prepare(optimizer)" in message
    assert sparsifier.step_count == 0  # the refused step counted nothing
    with pytest.raises(PrunelabError, match="still trains the old one"):
        sparsifier.prepare(optimizer)  # the same stale optimizer again
    assert sparsifier.params["0.weight"] is not model[0].weight  # nothing re-bound by a refused prepare
    new_optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier.prepare(new_optimizer)  # the fix the message names
    _train(model, new_optimizer, sparsifier, _batches(2))
    assert _pruned_nonzeros(sparsifier) == 0


def test_a_replaced_parameter_of_another_shape_or_a_parametrization_is_refused_in_one_line():
    model = _mlp()
    sparsifier = _oneshot(model).prepare()
    model[2].weight = nn.Parameter(torch.zeros(4, 33))
    with pytest.raises(PrunelabError, match=r"'2.weight' was replaced by a Parameter of shape \(4, 33\), not \(4, 32\)"):
        sparsifier.step()
    model = _mlp()
    sparsifier = _oneshot(model).prepare()
    parametrizations.weight_norm(model[0])
    with pytest.raises(PrunelabError, match="'0.weight' is no longer a plain initialised nn.Parameter"):
        sparsifier.step()
