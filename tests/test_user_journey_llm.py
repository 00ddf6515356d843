"""An LLM practitioner's journey with tiny random Hugging Face models (nothing is downloaded).

Every model is built from a config (hidden 32, 2-3 layers, vocabulary 128) and saved with
``save_pretrained`` plus a word-level tokenizer, so the CLI takes the folder as a user's
own model.  Paths walked: ``prunelab oneshot`` (subprocess and in-process) on LLaMA with
grouped-query attention, Qwen2, Mistral, GPT-2 (Conv1D), OPT, Phi, GPT-NeoX and BERT, then
``from_pretrained`` + hand counts + greedy generation; the 2:4 model materialised from
Python; the CLI's materialise / bench-latency / compress on a one-shot folder; Deep
Compression from Python; heads (OPT, the packaged MiniLM, LLaMA's refusal); layer dropping;
low rank.  Strict xfails are the expected behaviour where the journey found something wrong.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import string
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prunelab.errors import PrunelabError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 128
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *string.punctuation, *string.digits]
SRC = str(Path(__file__).resolve().parents[1] / "src")

CONFIGS = {
    "llama": lambda layers: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)),
    "qwen2": lambda layers: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)),
    "mistral": lambda layers: transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)),
    "gpt2": lambda layers: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64, bos_token_id=3, eos_token_id=3)),
    "opt": lambda layers: transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32)),
    "phi": lambda layers: transformers.PhiForCausalLM(transformers.PhiConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=64)),
    "neox": lambda layers: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=64)),
    "bert": lambda layers: transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=64)),
}
# Linear/Conv1D layers inside the blocks (what one-shot prunes), per block
BLOCK_LAYERS = {"llama": 7, "qwen2": 7, "mistral": 7, "gpt2": 4, "opt": 6, "phi": 6, "neox": 4, "bert": 6}
TIED = {"llama", "gpt2", "opt"}


def build(name: str, layers: int = 2):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CONFIGS[name](layers).eval()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="[SEP]",
                                                pad_token="[PAD]")


def _ids(rows: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(5, VOCAB, (rows, length), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Model folders for every architecture and a tiny tinyshakespeare corpus."""
    folder = tmp_path_factory.mktemp("llm_journey")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in CONFIGS:
            build(name).save_pretrained(folder / name)
            _tokenizer().save_pretrained(folder / name)
    corpus = folder / "data" / "tinyshakespeare"
    corpus.mkdir(parents=True)
    (corpus / "input.txt").write_text("".join(f"line {i} of the play , said the king to {i % 7} .\n"
                                              for i in range(300)))
    return folder


def _subprocess_oneshot(root: Path, argv: list[str]) -> dict:
    """``python3 -m prunelab oneshot ...`` in ``root``; stdout, stderr and the child's own peak RSS (os.wait4)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p)}
    out_path, err_path = root / f"{argv[1]}.stdout", root / f"{argv[1]}.stderr"
    with out_path.open("w") as out, err_path.open("w") as err:
        child = subprocess.Popen([sys.executable, "-m", "prunelab", "oneshot", *argv], cwd=root, env=env,
                                 stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    return {"code": child.returncode, "out": out_path.read_text(), "err": err_path.read_text(),
            "maxrss_mb": usage.ru_maxrss / 1024}


def _inprocess_oneshot(root: Path, argv: list[str]) -> dict:
    from prunelab.cli import main

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.chdir(root)
        code = main(["oneshot", *argv])
    return {"code": code, "out": out.getvalue(), "err": err.getvalue()}


# name -> (method, --sparsity or --pattern value, how it runs)
RUNS = {
    "llama": ("sparsegpt", "2:4", "subprocess"),  # with progress: checked below
    "gpt2": ("wanda", "0.5", "subprocess"),
    "qwen2": ("magnitude", "0.5", "inprocess"),
    "mistral": ("wanda", "2:4", "inprocess"),
    "opt": ("sparsegpt", "0.5", "inprocess"),
    "phi": ("magnitude", "2:4", "inprocess"),
    "neox": ("wanda", "0.5", "inprocess"),
    "bert": ("sparsegpt", "2:4", "inprocess"),
}


@pytest.fixture(scope="module")
def oneshot_runs(root) -> dict:
    runs = {}
    for name, (method, target, how) in RUNS.items():
        argv = [f"--model={name}", "--method", method, "--pattern" if ":" in target else "--sparsity", target,
                "--calib-samples", "8", "--data-dir", "data", "--out", f"out-{name}"]
        if name != "llama":
            argv.append("--no-progress")
        run = (_subprocess_oneshot if how == "subprocess" else _inprocess_oneshot)(root, argv)
        run["folder"] = root / f"out-{name}"
        runs[name] = run
    return runs


def _load(folder: Path, name: str):
    cls = transformers.BertModel if name == "bert" else transformers.AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(str(folder)).eval()


# --- one-shot from the CLI, reloaded with from_pretrained ------------------------------------
@pytest.mark.parametrize("name", list(RUNS))
def test_oneshot_cli_output_reloads_with_the_reported_sparsity_in_every_block_layer(name, root, oneshot_runs):
    from safetensors.torch import load_file

    method, target, _ = RUNS[name]
    run = oneshot_runs[name]
    assert run["code"] == 0, run["err"][-2000:]
    layers = 2 * BLOCK_LAYERS[name]
    assert run["out"].splitlines() == [run["out"].splitlines()[0]]  # one summary line on stdout
    assert run["out"].startswith(f"pruned {layers} layers of {name} with {method} to 50.00% sparsity in ")
    model, dense = _load(run["folder"], name), _load(root / name, name)
    masks = load_file(str(run["folder"] / "masks.safetensors"))
    params, dense_params = dict(model.named_parameters()), dict(dense.named_parameters())
    conv1d = transformers.pytorch_utils.Conv1D
    block_weights = {f"{n}.weight" for n, m in model.named_modules()
                     if isinstance(m, (torch.nn.Linear, conv1d)) and re.search(r"\.(layers|layer|h)\.\d+\.", n)}
    assert set(masks) == block_weights and len(masks) == layers
    for key, keep in masks.items():
        weight = params[key].detach()
        is_conv1d = isinstance(model.get_submodule(key.removesuffix(".weight")), conv1d)
        rows = weight.T if is_conv1d else weight  # (out, in): one row per output neuron
        assert torch.equal(weight != 0, keep), key  # zeros exactly where the saved mask prunes
        assert int((weight == 0).sum()) == weight.numel() // 2, key  # hand count: 50% of the layer
        if target == "2:4":  # every 4 consecutive inputs of an output keep exactly 2
            assert torch.equal((rows != 0).reshape(rows.shape[0], -1, 4).sum(-1),
                               torch.full((rows.shape[0], rows.shape[1] // 4), 2)), key
        if method == "wanda":  # Wanda compares the weights of one output: half of every output's inputs
            assert torch.equal((rows == 0).sum(1), torch.full((rows.shape[0],), rows.shape[1] // 2)), key
    untouched = [k for k in dense_params if k not in masks and not torch.equal(params[k], dense_params[k])]
    assert untouched == []  # embeddings, norms, biases, lm_head: as they were
    if name in TIED:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    record = json.loads((run["folder"] / "report.json").read_text())
    assert record["config"]["method"] == method
    assert record["config"]["pattern"] == (target if ":" in target else None)
    assert record["summary"]["pruned_layers"] == layers and record["summary"]["pruned_layer_sparsity"] == 0.5
    assert record["oneshot"]["dense_layers"] == (["pooler.dense"] if name == "bert" else ["lm_head"])
    if name != "bert":
        ids = _ids(1, 4)
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                       pad_token_id=0)
        assert generated.shape == (1, 7) and torch.equal(generated[:, :4], ids)


def test_oneshot_progress_goes_to_stderr_and_the_peak_rss_is_the_processes_own(oneshot_runs):
    with_progress, quiet = oneshot_runs["llama"], oneshot_runs["gpt2"]
    assert "[oneshot sparsegpt] model.layers.0.self_attn.q_proj (32, 32): sparsity 0.5000" in with_progress["err"]
    assert "[oneshot" not in with_progress["out"] and "[oneshot" not in quiet["err"]
    for run in (with_progress, quiet):
        reported = json.loads((run["folder"] / "report.json").read_text())["summary"]["peak_rss_mb"]
        # measured inside the child before it saved: at most the child's final peak, and close to it
        assert 0.85 * run["maxrss_mb"] <= reported <= run["maxrss_mb"] + 1
        assert f"(peak RSS {reported:.0f} MB)" in run["out"]


# --- after 2:4: materialise from Python ------------------------------------------------------
@pytest.fixture(scope="module")
def llama_2of4(oneshot_runs):
    from safetensors.torch import load_file

    folder = oneshot_runs["llama"]["folder"]
    return _load(folder, "llama"), load_file(str(folder / "masks.safetensors"))


def test_materialise_2of4_on_cpu_warns_falls_back_and_computes_the_same(llama_2of4):
    from prunelab.materialise import materialise
    from prunelab.materialise.sparse_modules import SemiStructuredLinear

    model, masks = llama_2of4
    ids = _ids()
    with pytest.warns(UserWarning, match="2:4 kernels need an NVIDIA Ampere or newer GPU"):
        new = materialise(model, "2:4", masks=masks, example_input=ids)
    swapped = sorted(n for n, m in new.named_modules() if isinstance(m, SemiStructuredLinear))
    assert swapped == sorted(k.removesuffix(".weight") for k in masks)
    assert [f.note for f in new.materialise_report.layers] == ["dense fallback"] * 14
    assert torch.equal(_logits(new, ids), _logits(model, ids))  # the fallback is the same dense matmul
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)  # the input model is untouched


@pytest.mark.parametrize("form", ["csr", "bsr", "auto"])
def test_materialise_sparse_formats_on_llama_keep_outputs_and_greedy_tokens(llama_2of4, form):
    from prunelab.materialise import materialise

    model, masks = llama_2of4
    ids = _ids()
    new = materialise(model, form, masks=masks, example_input=ids)
    kernels = [f.kernel for f in new.materialise_report.layers]
    assert len(kernels) == 14
    if form == "auto":  # measured per layer: any mix of kernels, each one chosen by timing
        assert set(kernels) <= {"dense", "csr", "bsr"}
        assert sorted(new.materialise_report.kernels.choices()) == sorted(k.removesuffix(".weight") for k in masks)
    else:
        assert kernels == [form] * 14
    torch.testing.assert_close(_logits(new, ids), _logits(model, ids), rtol=0, atol=1e-5)
    prompt = ids[:1, :4]
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
        got = new.generate(prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)


def test_materialise_gpt2_conv1d_layers_are_converted_or_refused():
    from prunelab.materialise import materialise
    from prunelab.oneshot import OneShotConfig, prune_oneshot

    model, ids = build("gpt2"), _ids()
    masks = prune_oneshot(model, [ids], OneShotConfig(method="magnitude", pattern="2:4"), progress=False).masks
    try:
        new = materialise(model, "csr", masks=masks, example_input=ids)
    except PrunelabError as exc:
        assert "Conv1D" in str(exc) and "\n" not in str(exc)
        return
    assert sorted(f.name for f in new.materialise_report.layers) == sorted(k.removesuffix(".weight") for k in masks)


def test_save_pretrained_of_a_materialised_model_works_or_is_a_one_line_error(llama_2of4, tmp_path):
    from prunelab.materialise import materialise

    model, masks = llama_2of4
    new = materialise(model, "csr", masks=masks, example_input=_ids())
    try:
        new.save_pretrained(str(tmp_path / "csr"))
    except PrunelabError as exc:
        assert "\n" not in str(exc)


def test_cli_materialise_bench_latency_and_compress_refuse_a_oneshot_folder_in_one_line(cli, oneshot_runs, tmp_path):
    folder = str(oneshot_runs["llama"]["folder"])
    for argv in (["materialise", folder, "--form", "2:4", "--out", str(tmp_path / "m")],
                 ["bench-latency", folder, "--forms", "csr"],
                 ["compress", folder, "--out", str(tmp_path / "x.plc")]):
        code, out, err = cli(*argv)
        assert (code, out) == (2, "")
        assert err == f"error: checkpoint folder {folder!r} has no checkpoint.json; pass the output folder of " \
                      "'prunelab prune'\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


# --- Deep Compression from Python ------------------------------------------------------------
def test_compress_a_2of4_llama_and_reload_it_into_a_fresh_model(llama_2of4, tmp_path):
    from prunelab.compress import read_compressed, write_compressed

    model, masks = llama_2of4
    write_compressed(tmp_path / "llama.plc", model, masks)
    fresh = build("llama")
    assert fresh.load_state_dict(read_compressed(tmp_path / "llama.plc"), strict=True).missing_keys == []
    params = dict(fresh.named_parameters())
    for key, keep in masks.items():
        assert torch.equal(params[key] != 0, keep), key  # the 2:4 zeros survive the file
        assert params[key][keep].unique().numel() <= 32, key  # 5-bit weight sharing of the kept weights
    assert fresh.lm_head.weight is fresh.get_input_embeddings().weight
    with torch.no_grad():
        generated = fresh.generate(_ids(1, 4), max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 7)


def test_compress_gpt2_with_its_oneshot_masks_works_or_names_conv1d(tmp_path):
    from prunelab.compress import read_compressed, write_compressed
    from prunelab.oneshot import OneShotConfig, prune_oneshot

    model, ids = build("gpt2"), _ids()
    masks = prune_oneshot(model, [ids], OneShotConfig(method="magnitude"), progress=False).masks
    try:
        write_compressed(tmp_path / "gpt2.plc", model, masks)
    except PrunelabError as exc:
        assert "Conv1D" in str(exc)
        return
    state = read_compressed(tmp_path / "gpt2.plc")
    assert all(torch.equal(state[k] != 0, keep) for k, keep in masks.items())


# --- attention heads -------------------------------------------------------------------------
def test_opt_heads_are_found_cut_and_generate_like_the_head_masked_model():
    from prunelab.heads import attention_units, head_magnitude, head_masks, remove_heads_

    model, ids = build("opt"), _ids()
    units = attention_units(model)
    assert [(u.num_heads, u.head_dim, u.o) for u in units.values()] == [
        (4, 8, f"model.decoder.layers.{i}.self_attn.out_proj") for i in (0, 1)]
    choice = head_masks(model, head_magnitude(model), 0.5)
    assert sum(int(k.sum()) for k in choice.keep.values()) == 4  # round(0.5 * 8) heads pruned
    masked = copy.deepcopy(model)
    choice.masks.apply_(masked)
    remove_heads_(model, choice.keep)
    for name, keep in choice.keep.items():
        assert model.get_submodule(f"{name}.k_proj").out_features == 8 * int(keep.sum())
        assert model.get_submodule(name).num_heads == int(keep.sum())
    torch.testing.assert_close(_logits(model, ids), _logits(masked, ids), rtol=0, atol=1e-5)
    prompt = ids[:1, :4]
    with torch.no_grad():  # the KV cache follows the new head count
        expected = masked.generate(prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
        got = model.generate(prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)


def test_minilm_heads_removed_then_rebuilt_from_a_state_dict_as_the_readme_says(monkeypatch):
    from prunelab.bench.minilm import minilm_path
    from prunelab.heads import head_magnitude, head_masks, remove_heads_

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        path = str(minilm_path())
    except PrunelabError as exc:
        pytest.skip(str(exc))
    model = transformers.BertModel.from_pretrained(path).eval()
    choice = head_masks(model, head_magnitude(model), 0.25)
    assert sum(int(k.sum()) for k in choice.keep.values()) == 54  # 72 heads, 18 pruned
    ids = torch.tensor([[101, 2000, 2022, 2030, 2025, 2000, 2022, 102]])
    masked = copy.deepcopy(model)
    choice.masks.apply_(masked)
    state = remove_heads_(model, choice.keep).state_dict()
    fresh = remove_heads_(transformers.BertModel.from_pretrained(path).eval(), choice.keep)
    fresh.load_state_dict(state)
    torch.testing.assert_close(_logits(fresh, ids), _logits(masked, ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_heads_of_grouped_query_attention_are_cut_by_key_value_group(name):
    from prunelab.heads import attention_units, head_magnitude, head_masks, remove_heads_

    model, ids = build(name), _ids()
    unit = next(iter(attention_units(model).values()))
    config = model.config
    assert (unit.num_heads, unit.group_size) == (config.num_key_value_heads,
                                                 config.num_attention_heads // config.num_key_value_heads)
    choice = head_masks(model, head_magnitude(model), 0.5)
    masked = copy.deepcopy(model)
    choice.masks.apply_(masked)
    remove_heads_(model, choice.keep)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, masked(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_shrink_of_opt_head_masks_works_or_points_at_remove_heads():
    from prunelab.heads import head_magnitude, head_masks
    from prunelab.materialise import materialise

    model, ids = build("opt"), _ids()
    choice = head_masks(model, head_magnitude(model), 0.5)
    try:
        new = materialise(model, "shrink", masks=choice.masks, example_input=ids)
    except PrunelabError as exc:
        assert "remove_heads_" in str(exc)
        return
    assert sum(p.numel() for p in new.parameters()) < sum(p.numel() for p in model.parameters())


# --- whole layers ----------------------------------------------------------------------------
def test_drop_a_llama_gqa_block_equals_skipping_it_and_reloads_with_from_pretrained(tmp_path):
    from prunelab.layers import block_influence, drop_blocks, lowest_influence

    model, ids = build("llama", layers=3), _ids()
    scores = block_influence(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    assert list(scores) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    dropped = lowest_influence(scores, 1)
    assert dropped == [min(scores, key=scores.get)]
    skipped = copy.deepcopy(model)  # independent reference: the dropped block returns its input
    skipped.get_submodule(dropped[0]).forward = lambda hidden_states, *args, **kwargs: hidden_states
    drop_blocks(model, dropped)
    assert model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    torch.testing.assert_close(_logits(model, ids), _logits(skipped, ids), rtol=0, atol=1e-6)
    model.save_pretrained(str(tmp_path / "shallow"))
    reloaded = _load(tmp_path / "shallow", "llama")
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))
    with torch.no_grad():
        full = reloaded(ids).logits[:, -1]
        first = reloaded(ids[:, :-1], use_cache=True)
        step = reloaded(ids[:, -1:], past_key_values=first.past_key_values).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=0, atol=1e-5)  # the KV cache indexes the renumbered layers


def test_cli_drop_layers_on_a_gpt2_folder_reloads_shallower(cli, root, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = root / "gpt2-1-layer"
    code, stdout, err = cli("drop-layers", "--model", str(root / "gpt2"), "--count", "1", "--calib-samples", "8",
                            "--data-dir", str(root / "data"), "--no-progress", "--out", str(out))
    assert code == 0, err
    record = json.loads((out / "report.json").read_text())
    assert record["summary"]["blocks_before"] == 2 and record["summary"]["blocks_after"] == 1
    assert record["dropped"] == [min(record["block_influence"], key=record["block_influence"].get)]
    model = _load(out, "gpt2")
    assert model.config.n_layer == 1 and len(model.transformer.h) == 1
    assert record["summary"]["params_after"] == sum(p.numel() for p in model.parameters())
    assert stdout.splitlines()[-1] == (f"dropped 1 of 2 blocks of {root / 'gpt2'}: parameters 31,616 -> "
                                       f"{record['summary']['params_after']:,}; wrote {out}/")


# --- low rank --------------------------------------------------------------------------------
def test_low_rank_llama_layers_are_the_truncated_svd_and_the_model_generates():
    from prunelab.lowrank import LowRankLinear, low_rank_model

    model = build("llama")
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in n}
    report = low_rank_model(model, 0.5)
    assert sorted(report.ranks) == sorted(originals)
    assert report.ranks["model.layers.0.self_attn.k_proj"] == 5  # 0.5 * 16 * 32 / (16 + 32) = 5.33 -> 5
    for name, weight in originals.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, LowRankLinear) and layer.rank == report.ranks[name]
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)  # brute-force reference
        r = layer.rank
        best = (u[:, :r] * s[:r]) @ vh[:r]
        torch.testing.assert_close((layer.second.weight @ layer.first.weight).double(), best, rtol=0, atol=1e-5)
    assert isinstance(model.lm_head, torch.nn.Linear)  # outside the blocks: dense, still tied
    assert model.lm_head.weight is model.get_input_embeddings().weight
    with torch.no_grad():
        generated = model.generate(_ids(1, 4), max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 7)


def test_whitened_low_rank_of_neox_fused_qkv_runs_with_fewer_weights():
    from prunelab.lowrank import low_rank_model

    model, ids = build("neox"), _ids()
    before = sum(p.numel() for p in model.parameters())
    report = low_rank_model(model, 0.5, [{"input_ids": ids}])
    # query_key_value (96x32), dense (32x32), dense_h_to_4h (64x32), dense_4h_to_h (32x64), per block
    assert [report.ranks[f"gpt_neox.layers.0.{n}"] for n in ("attention.query_key_value", "attention.dense",
                                                              "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")] == [
        12, 8, 10, 10]
    weights_before = 2 * (96 * 32 + 32 * 32 + 2 * 64 * 32)
    weights_after = 2 * (12 * 128 + 8 * 64 + 10 * 96 + 10 * 96)
    assert before - sum(p.numel() for p in model.parameters()) == weights_before - weights_after
    assert bool(torch.isfinite(_logits(model, ids)).all())


# --- counting --------------------------------------------------------------------------------
def test_measure_model_counts_gpt2_conv1d_layers_like_linears():
    from prunelab.measure.counting import measure_model

    ids = _ids(1, 12)
    llama = build("llama")
    linear_macs = sum(m.weight.numel() for m in llama.modules() if isinstance(m, torch.nn.Linear))
    assert measure_model(llama, ids).dense_flops == 2 * 12 * linear_macs  # the convention, on Linears
    gpt2 = build("gpt2")
    conv1d = transformers.pytorch_utils.Conv1D
    macs = sum(m.weight.numel() for m in gpt2.modules() if isinstance(m, (torch.nn.Linear, conv1d)))
    assert measure_model(gpt2, ids).dense_flops == 2 * 12 * macs
