"""The README's claims, checked against the code.

Three kinds of check:

* names: every ``--flag`` the README shows exists in the ``prunelab`` command it belongs to,
  every ``prunelab.x`` / ``from prunelab... import`` name resolves, and every call written in
  the hand-written prose (``low_rank_model(model, keep=0.5, calibration=batches)``) binds to
  the real signature;
* numbers: figures quoted in the hand-written prose (outside the generated
  ``<!-- readme:NAME -->`` sections) equal what ``benchmarks/results/*.json`` records;
* behaviour: each behavioural promise of the prose, on a tiny model with exact answers.

A claim found false is a ``xfail(strict=True)`` test of the claimed behaviour.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import math
import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import prunelab
from prunelab import MaskSet, PrunelabError, Sparsifier, materialise
from prunelab.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
LINES = README.splitlines()
RESULTS = ROOT / "benchmarks" / "results"


# --- reading the README ------------------------------------------------------------------
def _generated_line_numbers() -> set[int]:
    """0-based line numbers inside (and on) the ``<!-- readme:NAME -->`` markers."""
    inside, lines = False, set()
    for i, line in enumerate(LINES):
        if re.fullmatch(r"<!-- readme:\w+ -->", line):
            inside = True
        if inside:
            lines.add(i)
        if re.fullmatch(r"<!-- /readme:\w+ -->", line):
            inside = False
    return lines


GENERATED = _generated_line_numbers()
HAND_WRITTEN = "\n".join(line for i, line in enumerate(LINES) if i not in GENERATED)


def _strip_fences(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def _code_spans(text: str) -> list[str]:
    """Inline code spans of markdown prose (fenced blocks removed), line breaks folded."""
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", _strip_fences(text))]


def _fenced(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _subcommands() -> dict[str, set[str]]:
    """``prunelab`` subcommand -> its option strings, read from the real parser."""
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return {name: set(p._option_string_actions) for name, p in sub.choices.items()}


COMMANDS = _subcommands()
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _command_lines() -> list[list[str]]:
    """Every ``prunelab <cmd> ...`` the README writes out: ``$`` console lines and prose code spans."""
    found = []
    for line in LINES:
        if line.startswith("$ prunelab "):
            found.append(shlex.split(line[2:].split(";")[0]))
    for span in _code_spans(README):
        if span.startswith("prunelab ") and len(span.split()) > 1:
            found.append(span.split())
    return found


# flags the prose names outside a written-out `prunelab <cmd>` line, and where the README says they live
PROSE_FLAGS = {
    "--model": ("oneshot", "drop-layers"),           # "The transformer parts (`--model minilm`, ...)"
    "--data-dir": ("prune", "lottery", "compress", "materialise", "bench-latency"),
    "--download": ("prune", "lottery"),
    "--keep-first": ("prune",), "--keep-last": ("prune",), "--no-layer-floor": ("prune",),
    "--start-epoch": ("prune",), "--end-fraction": ("prune",), "--epochs": ("prune",),
    "--pretrain-epochs": ("prune",), "--rounds": ("prune", "lottery"), "--momentum": ("prune",),
    "--out": ("prune", "materialise", "oneshot", "drop-layers"),
    "--bias-correction": ("oneshot",), "--dense-targets": ("oneshot",),
    "--method": ("prune",), "--delta-t": ("prune",), "--alpha": ("prune",),
    "--config": ("prune",), "--rewind-iter": ("lottery",), "--resume": ("lottery",),
    "--per-layer": ("bench-latency",), "--pooling": ("bench-latency",), "--count": ("drop-layers",),
}
BENCHMARK_FLAGS = {"--quick", "--recipe"}  # flags of the benchmark scripts, not of `prunelab`


def _prose_flags() -> set[str]:
    prose = _strip_fences(README)
    spans = [s for s in _code_spans(README) if s.startswith("prunelab ")]
    for span in spans:  # flags of written-out commands are checked per command
        prose = prose.replace(span, "")
    # a flag quoted inside an error message of a console block is not prose
    return set(FLAG.findall(prose))


# --- names -------------------------------------------------------------------------------
def test_every_flag_of_a_written_out_command_exists_in_that_command():
    lines = _command_lines()
    assert len(lines) >= 15  # the console examples and the prose commands were all found
    for tokens in lines:
        command = tokens[1]
        assert command in COMMANDS, f"README runs `prunelab {command}`, which does not exist"
        for flag in (t.split("=")[0] for t in tokens[2:] if t.startswith("--")):
            assert flag in COMMANDS[command], f"README passes {flag} to `prunelab {command}`, which has no such flag"


def test_every_flag_named_in_the_prose_exists_where_the_readme_says():
    found = _prose_flags()
    assert found - BENCHMARK_FLAGS == set(PROSE_FLAGS), "update PROSE_FLAGS: the README's prose flags changed"
    for flag, commands in PROSE_FLAGS.items():
        for command in commands:
            assert flag in COMMANDS[command], f"README names {flag} for `prunelab {command}`, which has no such flag"


def test_benchmark_flags_the_readme_names_exist():
    from prunelab.bench.records import benchmark_args

    options = benchmark_args("x")._option_string_actions
    assert {"--quick", "--out"} <= set(options)
    snip = (ROOT / "benchmarks" / "snip_lenet300.py").read_text()
    assert 'add_argument("--recipe"' in snip and re.search(r'["\']paper["\']\s*:', snip)  # "--recipe paper"


def test_the_method_criterion_granularity_and_form_names_in_the_prose_are_registered():
    from prunelab.materialise import FORMS
    from prunelab.methods import METHODS

    spans = _code_spans(HAND_WRITTEN)
    methods = set()
    for span in spans:
        for choice in re.findall(r"--method ([\w|-]+)", span):
            methods |= set(choice.split("|"))
    assert methods == {"snip", "grasp", "force", "synflow", "random-erk", "pai-shuffled", "pai-reinit",
                       "set", "dsr", "rigl", "snfs", "static"}
    assert methods <= set(METHODS.names())
    assert {"oneshot", "iterative", "gradual", "lottery"} <= set(METHODS.names())
    forms = re.search(r'`materialise\(model, ("[^`]*"), masks=', " ".join(HAND_WRITTEN.split())).group(1)
    assert set(re.findall(r'"([^"]+)"', forms)) == set(FORMS.names())
    # the criteria bullet names exactly the registered criteria
    bullet = re.search(r"\* \*\*Criteria\*\*(.*?)\n\* ", HAND_WRITTEN, flags=re.S).group(1)
    named = {s for s in _code_spans(bullet) if re.fullmatch(r"[a-z0-9]+", s)}
    assert named == set(prunelab.CRITERIA.names())
    bullet = re.search(r"\* \*\*Granularities\*\*(.*?)\n\* ", HAND_WRITTEN, flags=re.S).group(1)
    named = {s for s in _code_spans(bullet) if re.fullmatch(r"[a-z]+", s)}
    assert named == set(prunelab.GRANULARITIES.names()) - {"nm"}  # N:M is written as `2:4`
    bullet = re.search(r"\* \*\*Allocations\*\*(.*?)\n\* ", HAND_WRITTEN, flags=re.S).group(1)
    named = {s for s in _code_spans(bullet) if re.fullmatch(r"[a-z]+", s)}
    assert named == set(prunelab.ALLOCATIONS.names())


def _resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)  # AttributeError: the README names something that does not exist
        return obj
    raise AssertionError(f"README names {dotted}, which does not import")


def test_every_dotted_prunelab_name_resolves():
    names = set(re.findall(r"\bprunelab(?:\.[A-Za-z_]\w*)+", README))
    assert {"prunelab.load", "prunelab.measure.measure_model", "prunelab.sparse_attention"} <= names
    for name in sorted(names):
        _resolve(name)


def test_every_from_prunelab_import_in_the_examples_resolves():
    imports = re.findall(r"^from (prunelab[\w.]*) import (.+)$", "\n".join(_fenced("python")), flags=re.M)
    assert len(imports) >= 3
    for module, names in imports:
        for name in (n.strip() for n in names.split("#")[0].split(",")):
            assert hasattr(importlib.import_module(module), name), f"from {module} import {name} fails"


def _method(cls, name):
    """A method's signature without ``self``."""
    sig = inspect.signature(getattr(cls, name))
    return sig.replace(parameters=list(sig.parameters.values())[1:])


def _calls():
    from prunelab import activations, heads, layers, lowrank, sparse_attention
    from prunelab.allocation import GlobalAllocation

    return {  # name as written -> the signature it must bind to (None: not prunelab's)
        "criterion": inspect.signature(prunelab.get_criterion("magnitude").__call__),
        "materialise": inspect.signature(materialise),
        "prunelab.load": inspect.signature(prunelab.load),
        "GlobalAllocation": inspect.signature(GlobalAllocation),
        "step": _method(Sparsifier, "step"),
        "head_masks": inspect.signature(heads.head_masks),
        "remove_heads_": inspect.signature(heads.remove_heads_),
        "drop_blocks": inspect.signature(layers.drop_blocks),
        "lowest_influence": inspect.signature(layers.lowest_influence),
        "low_rank_model": inspect.signature(lowrank.low_rank_model),
        "TopKActivation": inspect.signature(activations.TopKActivation),
        "activation_sparsity": inspect.signature(activations.activation_sparsity),
        "sparse_input_model": inspect.signature(activations.sparse_input_model),
        "local_attention": inspect.signature(sparse_attention.local_attention),
        "local_attention_mask": inspect.signature(sparse_attention.local_attention_mask),
        "model.state_dict": None,
        "save_pretrained": None,  # transformers' methods
        "from_pretrained": None,
        "cos": None,  # the formula `BI = 1 - E cos(x_in, x_out)`
    }


def _split_args(text: str) -> list[str]:
    args, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            args.append(current.strip())
            current = ""
        else:
            current += ch
    return [a for a in [*args, current.strip()] if a]


def test_every_call_written_in_the_prose_binds_to_the_real_signature():
    calls = _calls()
    written = []
    for span in _code_spans(HAND_WRITTEN):
        for match in re.finditer(r"(?<![\w.])([A-Za-z_][\w.]*)\(", span):
            start, depth = match.end(), 1
            end = start
            while end < len(span) and depth:
                depth += {"(": 1, ")": -1}.get(span[end], 0)
                end += 1
            written.append((match.group(1), span[start:end - 1]))
    names = {name for name, _ in written}
    assert names == set(calls), "update _calls(): the README's prose calls changed"
    for name, args in written:
        sig = calls[name]
        if sig is None:
            continue
        parts = _split_args(args)
        positional = [a for a in parts if not re.match(r"\w+=", a)]
        keywords = {a.split("=")[0]: None for a in parts if re.match(r"\w+=", a)}
        if "..." in positional:  # `materialise(..., pooling="auto")`: only the keywords are checked
            for key in keywords:
                assert key in sig.parameters, f"README calls {name}(..., {key}=...), which has no such argument"
        else:
            sig.bind(*positional, **keywords)  # TypeError: the README's call does not fit


def test_attributes_the_prose_names_exist():
    import dataclasses

    from prunelab.heads import HeadChoice
    from prunelab.measure import ModelCost
    from prunelab.oneshot import OneShotConfig

    assert "attention" in {f.name for f in dataclasses.fields(ModelCost)}  # `ModelCost.attention`
    assert "keep" in {f.name for f in dataclasses.fields(HeadChoice)}     # `choice.keep`
    assert {"bias_correction", "dense_targets"} <= {f.name for f in dataclasses.fields(OneShotConfig)}
    _resolve("prunelab.measure.energy")                                  # `measure.energy`
    _resolve("prunelab.measure.latency.layer_latency_ms")                # `measure.latency.layer_latency_ms`
    _resolve("prunelab.sparse_attention.block_local_attention")          # `block_local_attention`


def test_prunelab_list_describes_each_criterion(cli):
    code, out, _ = cli("list")
    assert code == 0
    criteria = out.split("criteria:\n")[1].split("\n\n")[0].splitlines()
    described = {line.split()[0]: line.split(None, 1)[1] for line in criteria}
    assert set(described) == set(prunelab.CRITERIA.names())
    assert all(len(text) > 10 for text in described.values())


# --- numbers quoted in the hand-written prose --------------------------------------------
def _rows(name: str) -> list[dict]:
    return json.loads((RESULTS / f"{name}.json").read_text())["rows"]


def _row(rows, method, sparsity):
    (row,) = [r for r in rows if r["method"] == method and r["sparsity"] == sparsity]
    return row


def _as_written(value: float, written: str) -> str:
    decimals = len(written.split(".")[1]) if "." in written else 0
    return f"{value:.{decimals}f}"


def test_dense_targets_figures_in_the_prose_match_the_records():
    text = " ".join(HAND_WRITTEN.split())
    match = re.search(r"cuts SparseGPT's perplexity increase on the char-GPT from (\d+\.\d+) to (\d+\.\d+) and raises "
                      r"the pruned MiniLM's mean cosine to the dense embeddings from (\d+\.\d+) to (\d+\.\d+)", text)
    assert match, "the dense-targets sentence changed; update this test"
    gpt, minilm = _rows("llm_oneshot_tinygpt"), _rows("minilm_oneshot")
    recorded = (_row(gpt, "sparsegpt", "50%")["ppl_increase"], _row(gpt, "sparsegpt + dense targets", "50%")["ppl_increase"],
                _row(minilm, "sparsegpt", "50%")["mean_cosine"],
                _row(minilm, "sparsegpt + dense targets", "50%")["mean_cosine"])
    assert [_as_written(v, w) for v, w in zip(recorded, match.groups())] == list(match.groups())


def test_sparse_attention_speed_range_in_the_prose_matches_the_record():
    text = " ".join(HAND_WRITTEN.split())
    match = re.search(r"Both are (\d+\.\d+)-(\d+\.\d+)x faster than PyTorch's fused dense causal attention at "
                      r"T = (\d+), window (\d+), on (\d) CPU cores", text)
    assert match, "the sparse-attention sentence changed; update this test"
    assert json.loads((RESULTS / "sparse_attention.json").read_text())["environment"]["threads"] == int(match.group(5))
    low, high, length, window, _ = match.groups()
    (row,) = [r for r in _rows("sparse_attention") if r["length"] == int(length) and r["window"] == int(window)]
    speeds = sorted([row["speedup_x"], row["block_speedup_x"]])
    assert [_as_written(speeds[0], low), _as_written(speeds[1], high)] == [low, high]


def test_lottery_rates_in_the_cli_prose_give_the_weights_left_the_readme_shows():
    """"20% of each hidden layer / 10% of the output layer per round" on digits_mlp (fc1, fc2 8192, fc3 640)."""
    section = README.split("### `prunelab lottery`")[1].split("### `prunelab compress`")[0]
    shown = re.findall(r"^\|\s+(\d)\s+\|\s+([\d.]+)\s+\|", section, flags=re.M)
    left = {int(r): float(p) for r, p in shown}
    assert set(left) == {0, 1, 2, 3, 4} and left[0] == 100.0
    for r in (1, 2, 3, 4):
        expected = 100 * (16384 * 0.8 ** r + 640 * 0.9 ** r) / 17024
        assert left[r] == pytest.approx(expected, abs=0.01)


# --- behaviour: the pipeline -------------------------------------------------------------
def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def _kept(masks) -> dict[str, int]:
    return {layer.name: layer.kept for layer in masks.stats().layers}


def test_a_criterion_is_a_pure_callable_returning_one_score_per_fqn():
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    scores = prunelab.get_criterion("magnitude")(model, params, None)
    assert set(scores) == set(params)
    for name, p in params.items():
        torch.testing.assert_close(scores[name], p.detach().abs(), rtol=0, atol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_an_nm_pattern_fixes_the_sparsity_and_a_conflicting_target_is_refused():
    model = _mlp()
    sparsifier = Sparsifier(model, granularity="2:4").prepare(None)
    with pytest.raises(PrunelabError, match="1 - N/M"):
        sparsifier.update(0.7)
    masks = sparsifier.update(0.5)
    for name, mask in masks.items():
        groups = mask.reshape(mask.shape[0], -1, 4)  # (out, in/4, 4) along the input dimension
        assert (groups.sum(-1) == 2).all(), name


def _cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.Flatten(), nn.Linear(96, 5))


def _group_size(granularity: str, shape: tuple[int, ...]) -> int:
    conv = len(shape) == 4
    return {"unstructured": 1, "channel": math.prod(shape[1:]), "kernel": math.prod(shape[2:]),
            "vector": shape[-1] if conv else 1}[granularity]


@pytest.mark.parametrize("make_model", [_mlp, _cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("granularity", ["unstructured", "channel", "kernel", "vector"])
@pytest.mark.parametrize("allocation", ["global", "uniform", "erk", "lamp"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "random"])
def test_achieved_sparsity_is_the_target_up_to_one_group_per_layer(make_model, granularity, allocation, tied):
    model = make_model(1)
    if tied:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(0.5)
    sparsifier = Sparsifier(model, granularity=granularity, allocation=allocation).prepare(None)
    stats = sparsifier.update(0.6).stats()
    total = sum(layer.total for layer in stats.layers)
    group = {layer.name: _group_size(granularity, tuple(layer.shape)) for layer in stats.layers}
    assert abs(sum(layer.kept for layer in stats.layers) - 0.4 * total) <= sum(group.values())
    if allocation == "uniform":
        for layer in stats.layers:
            assert abs(layer.kept - 0.4 * layer.total) <= group[layer.name]


def _one_small_layer():
    model = _mlp(2)
    with torch.no_grad():
        model[2].weight.mul_(1e-6)  # scores far below every other layer's
    return model


def test_structured_global_keeps_a_group_of_every_layer_unless_the_floor_is_off():
    from prunelab.allocation import GlobalAllocation

    floored = Sparsifier(_one_small_layer(), granularity="channel", allocation="global").prepare(None)
    assert min(_kept(floored.update(0.6)).values()) > 0
    bare = Sparsifier(_one_small_layer(), granularity="channel",
                      allocation=GlobalAllocation(keep_one_group=False)).prepare(None)
    assert _kept(bare.update(0.6))["2.weight"] == 0


def test_unstructured_global_has_no_floor():
    sparsifier = Sparsifier(_one_small_layer(), granularity="unstructured", allocation="global").prepare(None)
    assert _kept(sparsifier.update(0.6))["2.weight"] == 0


def test_global_threshold_needs_no_sort(monkeypatch):
    """"one threshold, found by bisection -- no full sort": the allocation runs with every sort disabled."""
    model = _mlp(3)
    sparsifier = Sparsifier(model, allocation="global").prepare(None)

    def refuse(*args, **kwargs):
        raise AssertionError("global allocation sorted a tensor")

    for name in ("sort", "argsort", "msort"):
        monkeypatch.setattr(torch, name, refuse)
        monkeypatch.setattr(torch.Tensor, name, refuse)
    masks = sparsifier.update(0.75)
    weights = torch.cat([p.detach().abs().flatten() for n, p in _mlp(3).named_parameters() if n.endswith("weight")])
    monkeypatch.undo()
    kept = int(0.25 * weights.numel())
    threshold = weights.sort(descending=True).values[kept - 1]  # brute-force reference (no ties in random weights)
    assert sum(_kept(masks).values()) == kept
    for name, mask in masks.items():
        original = dict(_mlp(3).named_parameters())[name].detach().abs()
        assert torch.equal(mask, original >= threshold)


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda p: torch.optim.Adam(p, lr=0.01),
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
], ids=["sgd-momentum-wd", "adam", "adamw"])
def test_pruned_weights_and_their_optimizer_state_stay_zero(make_optimizer):
    model = _mlp(4)
    optimizer = make_optimizer(model.parameters())
    sparsifier = Sparsifier(model, schedule=prunelab.OneShot(0.7)).prepare(optimizer)
    x, y = torch.randn(16, 12), torch.randint(0, 4, (16,))
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        sparsifier.step()
    masks = sparsifier.finalize()
    assert masks.stats().sparsity == pytest.approx(0.7, abs=0.01)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert (params[name][~mask] == 0).all()
        state = optimizer.state[params[name]]
        moments = [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == mask.shape]
        assert moments and all((m[~mask] == 0).all() for m in moments)


def test_step_reapplies_the_masks_before_a_scheduled_update():
    """The update scores the network the masks define, not the one the optimizer just moved."""
    model = _mlp(5)
    seen = []
    criterion = prunelab.get_criterion("magnitude")

    class Recording(type(criterion)):
        def score(self, model, params, data):
            seen.append({n: p.detach().clone() for n, p in params.items()})
            return super().score(model, params, data)

    schedule = prunelab.Cubic(0.8, initial_sparsity=0.5, start_step=0, num_updates=1, frequency=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    sparsifier = Sparsifier(model, criterion=Recording(), schedule=schedule).prepare(optimizer)
    first = MaskSet(dict(sparsifier.masks.items()))
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(8, 12)), torch.randint(0, 4, (8,))).backward()
    optimizer.step()  # pruned weights move by -lr * grad
    sparsifier.step()  # step 1: the scheduled update to 0.8
    assert len(seen) == 2
    for name, mask in first.items():
        assert (seen[1][name][~mask] == 0).all()


def test_masks_are_decided_from_scores_averaged_over_ranks(monkeypatch):
    """Every score passes through the rank-mean before a mask is decided (world size 1 here; the
    two-process check is tests/test_distributed.py::test_two_rank_masks_identical)."""
    from prunelab import distributed

    reduced = []
    real = distributed.all_reduce_mean_

    def spy(tensor):
        reduced.append(tensor.shape)
        return real(tensor)

    monkeypatch.setattr(distributed, "all_reduce_mean_", spy)
    model = _mlp(6)
    Sparsifier(model).prepare(None).update(0.5)
    assert sorted(reduced) == sorted(p.shape for n, p in model.named_parameters() if n.endswith("weight"))


def test_keep_first_dense_and_keep_last_max_sparsity():
    from prunelab import LayerRules

    sparsifier = Sparsifier(_mlp(7), rules=LayerRules(keep_first="dense", keep_last=0.25)).prepare(None)
    stats = {layer.name: layer for layer in sparsifier.update(0.3).stats().layers}
    assert stats["0.weight"].sparsity == 0.0
    assert stats["4.weight"].sparsity <= 0.25 + 1 / 32


def test_gradual_start_epoch_is_t0_and_end_fraction_is_a_fraction_of_epochs():
    from prunelab.methods.base import PruneSpec
    from prunelab.methods.gradual import gradual_window

    spec = PruneSpec(sparsity=0.9, start_epoch=1, end_fraction=0.5, num_updates=4)
    assert gradual_window(spec, epochs=4, steps_per_epoch=10) == (10, 20, 2)  # t0 = 1 x 10; end = 0.5 x 40


# --- behaviour: the CLI ------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("readme") / "demo"
    assert main(["demo", "--no-progress", "--out", str(out)]) == 0
    return out


def test_demo_prunes_iteratively_to_90_percent_and_writes_its_results(demo):
    assert {"results.json", "report.md", "sparsity_curve.png", "model.safetensors", "masks.safetensors",
            "checkpoint.json"} <= {p.name for p in demo.iterdir()}
    record = json.loads((demo / "results.json").read_text())
    assert record["achieved_sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert [row["stage"] for row in record["stages"]] == ["dense"] + [f"round {r}" for r in range(1, 6)]


def test_the_state_dict_is_plain_and_loads_into_the_unpruned_architecture(demo):
    from prunelab.bench.models import build_model

    state, masks = load_file(str(demo / "model.safetensors")), load_file(str(demo / "masks.safetensors"))
    fresh = build_model("digits_mlp", (1, 8, 8), 10)
    fresh.load_state_dict(state, strict=True)  # no weight_orig / weight_mask renames
    assert set(masks) == {n for n, _ in fresh.named_parameters() if n.endswith("weight")}  # keyed by FQN
    for name, mask in masks.items():
        assert (state[name][~mask.bool()] == 0).all()  # masked weights stored as real zeros


def test_load_rebuilds_a_checkpoint_and_a_materialised_folder_or_a_file_inside_it(demo, tmp_path):
    out = tmp_path / "csr"
    assert main(["materialise", str(demo), "--form", "csr", "--out", str(out)]) == 0
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        reference = prunelab.load(demo)(x)
        for path in [out, *sorted(out.iterdir())]:
            model = prunelab.load(path)
            assert any(type(m).__name__ == "CSRLinear" for m in model.modules())
            torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=0)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_another_commands_out_folder_is_refused_before_any_work(demo, tmp_path, capsys):
    before = _snapshot(demo)
    assert main(["materialise", str(demo), "--form", "csr", "--out", str(demo)]) == 2
    assert _snapshot(demo) == before
    mat = tmp_path / "m"
    assert main(["materialise", str(demo), "--form", "csr", "--out", str(mat)]) == 0
    assert main(["materialise", str(demo), "--form", "bsr", "--out", str(mat)]) == 0  # its own earlier output
    made = _snapshot(mat)
    assert main(["prune", "--model", "digits_mlp", "--method", "oneshot", "--no-progress", "--out", str(mat)]) == 2
    assert _snapshot(mat) == made
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --out") and "not an earlier prune run" in err[-1]


@pytest.mark.parametrize("argv", [
    ["--method", "snip", "--pretrain-epochs", "2"],        # from-scratch method
    ["--method", "oneshot", "--rounds", "3"],              # outside iterative / lottery
    ["--method", "gradual", "--rounds", "3"],
    ["--method", "oneshot", "--optimizer", "adam", "--momentum", "0.9"],
    ["--method", "static", "--delta-t", "10"],             # only the four that rewire
    ["--method", "static", "--alpha", "0.3"],
    ["--method", "static", "--end-fraction", "0.5"],
    ["--method", "oneshot", "--start-epoch", "1"],
], ids=lambda a: " ".join(a))
def test_prune_refuses_options_the_method_would_ignore(argv, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", "--model", "digits_mlp", "--no-progress", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "would be ignored" in err[0]
    assert not out.exists()


def _bad_input_example():
    start = LINES.index("### Bad input")
    command = next(line for line in LINES[start:] if line.startswith("$ prunelab "))
    error = next(line for line in LINES[start:] if line.startswith("error: "))
    argv = shlex.split(command[2:].split(";")[0])[1:]
    return argv, error


def test_bad_input_is_one_line_on_stderr_exit_2_nothing_written(tmp_path, capsys):
    argv, _ = _bad_input_example()
    out = tmp_path / "bad"
    assert main([*argv, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and captured.err.startswith("error: ")
    assert not out.exists()


def test_the_bad_input_message_the_readme_shows_is_the_one_printed(tmp_path, capsys):
    argv, shown = _bad_input_example()
    main([*argv, "--out", str(tmp_path / "bad")])
    assert capsys.readouterr().err.strip() == shown


# --- behaviour: materialise --------------------------------------------------------------
def _masked_mlp():
    model = _mlp(8)
    torch.manual_seed(9)
    masks = {n: torch.rand(p.shape) > 0.6 for n, p in model.named_parameters() if n.endswith("weight")}
    return model, masks


@pytest.mark.parametrize("form, dtype", [
    *[(form, dtype) for form in ("csr", "bsr", "auto") for dtype in (torch.float32, torch.float16, torch.bfloat16)],
    ("2:4", torch.float32),  # on CPU its dense fallback, with a warning
])
def test_every_sparse_form_computes_the_masked_model(form, dtype):
    """fp16 / bf16 included: "fp16/bf16 CSR/BSR layers run on CPU through an fp32 copy"."""
    model, masks = _masked_mlp()
    if form == "2:4":
        from prunelab.structure import NM

        masks = {n: NM(2, 4).pattern_mask(torch.rand(m.shape)) for n, m in masks.items()}
    model = model.to(dtype)
    x = torch.randn(6, 12).to(dtype)
    with pytest.warns(UserWarning) if form == "2:4" else _nothing():
        new = materialise(model, form, masks=masks, example_input=x)
    masked = MaskSet(masks).apply_(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(new(x), masked(x), atol=1e-2 if dtype != torch.float32 else 1e-5, rtol=0)
    assert any((p == 0).sum() == 0 for p in model.parameters())  # `model` itself is untouched (no masks applied)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_shrink_gives_a_physically_smaller_model_equal_to_the_masked_one():
    model = _mlp(10)
    masks = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters() if n.endswith("weight")}
    masks["0.weight"][::2] = False  # half the channels of the first layer
    x = torch.randn(4, 12)
    new = materialise(model, "shrink", masks=masks, example_input=x)
    assert (new[0].out_features, new[2].in_features) == (8, 8)
    with torch.no_grad():
        torch.testing.assert_close(new(x), MaskSet(masks).apply_(copy.deepcopy(model))(x), atol=1e-6, rtol=0)


def test_a_form_is_proven_equal_to_the_masked_model_before_it_is_returned(monkeypatch):
    import sys

    mat = sys.modules["prunelab.materialise"]  # `import prunelab.materialise as m` gives the function
    real = mat.build_sparse

    def wrong(module, kernel, **kwargs):  # a kernel whose outputs are off by one
        new = real(module, kernel, **kwargs)
        if isinstance(module, nn.Linear) and module.bias is not None:
            broken = copy.deepcopy(module)
            with torch.no_grad():
                broken.bias.add_(1.0)
            return broken
        return new

    monkeypatch.setattr(mat, "build_sparse", wrong)
    model, masks = _masked_mlp()
    with pytest.raises(PrunelabError):
        materialise(model, "csr", masks=masks, example_input=torch.randn(3, 12))


def test_auto_keeps_a_sparse_kernel_only_where_it_is_no_slower():
    from fake_timer import FakeTimer

    model, masks = _masked_mlp()
    timer = FakeTimer({("0", "csr"): 0.5, ("0", "bsr"): 2.0, ("2", "csr"): 1.5, ("2", "bsr"): 1.2,
                       ("4", "csr"): 1.0, ("4", "bsr"): 3.0})  # dense: 1.0 everywhere
    new = materialise(model, "auto", masks=masks, example_input=torch.randn(4, 12), timer=timer)
    kernels = {layer.name: layer.kernel for layer in new.materialise_report.layers}
    assert kernels == {"0": "csr", "2": "dense", "4": "dense"}  # "4": a tie goes to dense, the earlier candidate


def test_measure_model_counts_linear_macs_and_attention_apart():
    from prunelab.bench.row_transformer import SelfAttention
    from prunelab.measure import measure_model

    model = nn.Sequential(SelfAttention(8, 2))
    cost = measure_model(model, torch.randn(1, 5, 8))
    assert sum(layer.dense_macs for layer in cost.layers) == 4 * 5 * 8 * 8  # q, k, v, out projections, T = 5
    assert cost.attention and cost.attention_macs == 2 * 5 * 5 * 8  # Q K^T and A V (T x T x d each), apart


# --- behaviour: one-shot, heads, layers, low rank, activations, attention -------------------
@pytest.mark.parametrize("config", [
    dict(method="sparsegpt", sparsity=0.5, dense_targets=True), dict(method="wanda", sparsity=0.5, bias_correction=True),
    dict(method="obs", pattern="2:4"), dict(method="lobs", sparsity=0.5), dict(method="magnitude", sparsity=0.5),
], ids=lambda c: c["method"])
def test_oneshot_prunes_every_linear_with_each_solver(config):
    from prunelab.oneshot import OneShotConfig, prune_oneshot

    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    report = prune_oneshot(model, [torch.randn(32, 8) for _ in range(2)], OneShotConfig(**config), progress=False)
    assert report.sparsity == 0.5 and len(report.rows) == 2
    assert [float((model[i].weight == 0).float().mean()) for i in (0, 2)] == [0.5, 0.5]
    assert all(row.error >= 0 for row in report.rows) and report.wall_time_s >= 0 and report.peak_rss_mb > 0


def test_head_masks_then_materialise_shrink_removes_heads_in_the_q_proj_layout():
    from prunelab.bench.row_transformer import SelfAttention
    from prunelab.heads import head_magnitude, head_masks

    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(6, 16), SelfAttention(16, 4), nn.Linear(16, 3))
    choice = head_masks(model, head_magnitude(model), 0.5)
    x = torch.randn(2, 5, 6)
    masked = choice.masks.apply_(copy.deepcopy(model))
    shrunk = materialise(masked, "shrink", masks=choice.masks, example_input=x)
    assert shrunk[1].num_heads == 2 and shrunk[1].q_proj.out_features == 8
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), masked(x), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=32, max_position_embeddings=16)
    return transformers, config


def test_bert_heads_go_through_remove_heads_and_reload_on_a_fresh_model(tiny_bert):
    from prunelab.heads import head_magnitude, head_masks, remove_heads_

    transformers, config = tiny_bert
    torch.manual_seed(13)
    model = transformers.BertModel(config).eval()
    choice = head_masks(model, head_magnitude(model), 0.5)
    masked = choice.masks.apply_(copy.deepcopy(model))
    cut = remove_heads_(copy.deepcopy(masked), choice.keep)
    ids = torch.randint(0, 40, (2, 7))
    fresh = remove_heads_(transformers.BertModel(config).eval(), choice.keep)
    fresh.load_state_dict(cut.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(cut(ids).last_hidden_state, masked(ids).last_hidden_state, atol=1e-5, rtol=0)
        torch.testing.assert_close(fresh(ids).last_hidden_state, cut(ids).last_hidden_state, atol=0, rtol=0)
    assert sum(layer.attention.self.num_attention_heads for layer in cut.encoder.layer) == 6


def test_drop_blocks_makes_a_transformers_model_shallower_and_it_reloads(tiny_bert, tmp_path):
    from prunelab.layers import block_influence, drop_blocks, lowest_influence

    transformers, config = tiny_bert
    torch.manual_seed(14)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 40, (2, 7))
    scores = block_influence(model, [{"input_ids": ids}])
    drop_blocks(model, lowest_influence(scores, 1))
    assert model.config.num_hidden_layers == len(model.encoder.layer) == 2
    model.save_pretrained(tmp_path)
    again = transformers.BertModel.from_pretrained(str(tmp_path), local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).last_hidden_state, model(ids).last_hidden_state, atol=0, rtol=0)


def test_low_rank_model_replaces_each_linear_in_place_by_two_thin_ones_holding_keep_of_its_weights():
    from prunelab.lowrank import low_rank_model

    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with torch.no_grad():  # rank-8 weights: a rank-16 truncated SVD reproduces them exactly
        for i in (0, 2):
            model[i].weight.copy_(torch.randn(64, 8) @ torch.randn(8, 64) / 8)
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = model(x)
    report = low_rank_model(model, keep=0.5)
    assert report.keep == 0.5 and report.ranks == {"0": 16, "2": 16}  # 16 x (64 + 64) = half of 64 x 64
    linears = [m for m in model[0].modules() if isinstance(m, nn.Linear)]
    assert sorted(tuple(m.weight.shape) for m in linears) == [(16, 64), (64, 16)]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=0)


def test_topk_activation_activation_sparsity_and_sparse_input_model():
    from prunelab.activations import TopKActivation, activation_sparsity, sparse_input_model

    torch.manual_seed(16)
    mlp = nn.Sequential(nn.Linear(10, 20), TopKActivation(5), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 3))
    x = torch.randn(7, 10)
    with torch.no_grad():
        hidden = mlp[1](mlp[0](x))
        relu = mlp[3](mlp[2](hidden))
    assert ((hidden != 0).sum(1) == 5).all()  # k winners take all
    zeros = activation_sparsity(mlp, [x])
    assert list(zeros.values()) == pytest.approx([15 / 20, float((relu == 0).float().mean())])
    fast = sparse_input_model(mlp)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), mlp(x), atol=1e-5, rtol=0)


def test_local_and_block_local_attention_equal_dense_attention_with_their_masks():
    from prunelab.sparse_attention import block_local_attention, block_local_attention_mask, local_attention, local_attention_mask

    torch.manual_seed(17)
    q, k, v = (torch.randn(2, 3, 100, 8) for _ in range(3))
    window = 16
    i, j = torch.arange(100).unsqueeze(1), torch.arange(100).unsqueeze(0)
    expected_mask = (j <= i) & (j > i - window)  # query i sees keys i - window < j <= i
    assert torch.equal(local_attention_mask(100, window), expected_mask)
    dense = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=expected_mask)
    torch.testing.assert_close(local_attention(q, k, v, window), dense, atol=1e-5, rtol=0)
    block_mask = (j <= i) & (j // window >= i // window - 1)  # own block (earlier keys) plus the previous one
    assert torch.equal(block_local_attention_mask(100, window), block_mask)
    dense = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=block_mask)
    torch.testing.assert_close(block_local_attention(q, k, v, window), dense, atol=1e-5, rtol=0)


def test_deep_compression_writes_one_checksummed_file(tmp_path):
    from prunelab.compress import read_compressed, write_compressed

    model, masks = _masked_mlp()
    path = tmp_path / "m.plc"
    write_compressed(path, model, masks, bits=4)
    decoded = read_compressed(path)
    assert {n for n in decoded if n.endswith("weight")} == set(masks)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(PrunelabError):
        read_compressed(path)


# --- set-up claims, APoZ, energy, low rank with calibration, pooling, and the rest ------------
def test_the_readme_test_command_is_what_ci_runs_and_the_test_extra_includes_transformers():
    import tomllib

    block = re.search(r"The tests \(the same command `\.ci/run` runs\):\n\n```bash\n(.*?)\n```", README).group(1)
    ci = (ROOT / ".ci" / "run").read_text().replace(" --quiet", "")
    for command in block.split(" && "):
        assert command in ci, f"README's test command part {command!r} is not in .ci/run"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras["transformers"]) <= set(extras["test"])
    assert 'requires-python = ">=3.10"' in (ROOT / "pyproject.toml").read_text()  # "Python >= 3.10"


def test_apoz_counts_zeros_of_the_relu_after_each_layer_through_bn_dropout_and_bias():
    torch.manual_seed(18)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Dropout(0.5), nn.ReLU(), nn.Linear(5, 3)).eval()
    with torch.no_grad():
        model[1].running_mean.copy_(torch.randn(5))
        model[1].bias.copy_(torch.randn(5))
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    with torch.no_grad():
        post_relu = model[3](model[1](model[0](x)))  # dropout is the identity in eval
    scores = prunelab.get_criterion("apoz")(model, {"0.weight": model[0].weight},
                                            prunelab.ScoreData([(x, y)]))
    expected = (post_relu != 0).double().mean(0)  # 1 - APoZ per neuron
    torch.testing.assert_close(scores["0.weight"][:, 0].double(), expected, atol=1e-6, rtol=0)
    assert not torch.equal(expected, (model[0](x) > 0).double().mean(0))  # BN moved the zeros: a real check


def test_energy_uses_horowitz_45nm_table():
    from prunelab.measure.energy import HOROWITZ_45NM

    t = HOROWITZ_45NM  # Horowitz, ISSCC 2014: 32-bit float add / mult, int add / mult, 8 KB SRAM, DRAM (pJ)
    assert (t.float_add_pj, t.float_mult_pj, t.int_add_pj, t.int_mult_pj, t.sram_pj, t.dram_pj) == (
        0.9, 3.7, 0.1, 3.1, 5.0, 640.0)


def test_whitened_svd_has_no_larger_output_error_on_the_calibration_inputs_than_plain_svd():
    from prunelab.lowrank import low_rank_model

    torch.manual_seed(19)
    base = nn.Sequential(nn.Linear(32, 32))
    x = torch.randn(256, 32) * torch.linspace(0.1, 3.0, 32)  # uneven feature scales: whitening matters
    with torch.no_grad():
        expected = base(x)
    errors = {}
    for name, calibration in (("plain", None), ("whitened", [x])):
        model = copy.deepcopy(base)
        low_rank_model(model, keep=0.25, calibration=calibration)
        with torch.no_grad():
            errors[name] = float((model(x) - expected).square().sum())
    assert errors["whitened"] < errors["plain"]


def test_measure_model_counts_csr_layers_as_their_nonzeros():
    from prunelab.measure import measure_model

    model, masks = _masked_mlp()
    x = torch.randn(1, 12)
    sparse = materialise(model, "csr", masks=masks, example_input=x)
    cost = measure_model(sparse, x)
    assert cost.weight_nonzeros == sum(int(m.sum()) for m in masks.values())
    assert cost.sparse_macs == sum(int(m.sum()) for m in masks.values())  # batch 1, Linear: one MAC per weight


def test_pooling_auto_keeps_the_outputs_exact():
    torch.manual_seed(20)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 3))
    masks = {"4.weight": torch.rand(3, 64) > 0.5}
    x = torch.randn(2, 1, 8, 8)
    new = materialise(model, "csr", masks=masks, example_input=x, pooling="auto")
    assert new.materialise_report.pools is not None
    with torch.no_grad():
        torch.testing.assert_close(new(x), MaskSet(masks).apply_(copy.deepcopy(model))(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("argv", [
    ["oneshot", "--model", "minilm", "--method", "wanda", "--sparsity", "0.5", "--no-progress"],
    ["drop-layers", "--model", "minilm", "--count", "1", "--no-progress"],
], ids=["oneshot", "drop-layers"])
def test_oneshot_and_drop_layers_refuse_a_prune_run_as_out_before_any_work(argv, demo, capsys):
    before = _snapshot(demo)
    assert main([*argv, "--out", str(demo)]) == 2
    assert _snapshot(demo) == before
    assert f"not an earlier {argv[0]} output" in capsys.readouterr().err


def test_inspect_shows_the_checkpoints_per_layer_sparsity(demo, cli):
    code, out, _ = cli("inspect", str(demo))
    assert code == 0
    masks = load_file(str(demo / "masks.safetensors"))
    for name, mask in masks.items():
        row = next(line for line in out.splitlines() if line.startswith(f"| {name} "))
        assert f"{100 * (1 - mask.float().mean().item()):.2f}" in row
    total = next(line for line in out.splitlines() if line.startswith("| total"))
    assert "90.00" in total


def test_the_import_prunelab_list_prints_for_shrink_works_as_written():
    # `prunelab.materialise` is the materialise() function (prunelab/__init__.py), so the list names an import
    from prunelab.materialise import FORMS

    statement = re.search(r"\((from prunelab\.[\w.]+ import \w+)\)", FORMS.describe("shrink")).group(1)
    namespace: dict = {}
    exec(statement, namespace)  # noqa: S102 -- the statement the registry prints
    assert callable(namespace["shrink_model"])


def test_mnist_is_read_from_data_dir_else_prunelab_data_else_the_cache(tmp_path, monkeypatch):
    from prunelab.bench.datasets import find_mnist_files
    from prunelab.bench.download import MNIST_FILES

    folders = {name: tmp_path / name for name in ("flag", "env", "cache/prunelab/mnist")}
    for folder in folders.values():
        folder.mkdir(parents=True)
        for file in MNIST_FILES:
            (folder / file).write_bytes(b"")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PRUNELAB_DATA", str(folders["env"]))
    assert {p.parent for p in find_mnist_files(folders["flag"]).values()} == {folders["flag"]}
    assert {p.parent for p in find_mnist_files(None).values()} == {folders["env"]}
    monkeypatch.delenv("PRUNELAB_DATA")
    assert {p.parent for p in find_mnist_files(None).values()} == {folders["cache/prunelab/mnist"]}


def test_download_keeps_a_file_only_when_its_sha256_matches(tmp_path):
    from prunelab.bench.download import MNIST_FILES, download_mnist

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in MNIST_FILES:
        (mirror / name).write_bytes(b"not mnist")
    dest = tmp_path / "dest"
    with pytest.raises(PrunelabError, match="sha256"):
        download_mnist(dest, base_url=mirror.as_uri())
    assert not any(dest.iterdir())


def test_the_recorded_mnist_checksums_are_those_of_the_original_files(mnist_dir):
    from prunelab.bench.download import MNIST_FILES, sha256_file

    for name, digest in MNIST_FILES.items():
        assert sha256_file(mnist_dir / name) == digest
