"""Tiny Shakespeare as a character-level corpus: splits, batches, calibration, lines.

The corpus is Karpathy's ``tinyshakespeare/input.txt`` (char-rnn, 2015; the file
nanoGPT's ``data/shakespeare_char/prepare.py`` downloads): 1,115,394 ASCII characters,
65 distinct.  As in nanoGPT's ``prepare.py`` the vocabulary is the sorted set of
characters of the whole file and the first 90% of the characters are the training split,
the last 10% the validation split.

Everything here is deterministic: random windows come from a ``torch.Generator`` seeded
by the caller, never from the global RNG.

The file is looked up in ``data_dir``, else ``$PRUNELAB_DATA``, else ``../shared/data``
beside the checkout; in each folder as ``tinyshakespeare/input.txt`` or ``input.txt``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from prunelab.errors import PrunelabError

__all__ = [
    "TRAIN_FRACTION", "CharCorpus", "calibration_lines", "calibration_sequences", "eval_windows",
    "find_tinyshakespeare", "get_batch", "held_out_lines", "load_tinyshakespeare", "split_lines",
    "train_batches",
]

TRAIN_FRACTION = 0.9
FILE_NAME = "input.txt"
SUBFOLDER = "tinyshakespeare"


def _default_roots(data_dir: str | os.PathLike | None) -> tuple[list[Path], str]:
    if data_dir is not None:
        return [Path(data_dir).expanduser()], "--data-dir"
    if os.environ.get("PRUNELAB_DATA"):
        return [Path(os.environ["PRUNELAB_DATA"]).expanduser()], "$PRUNELAB_DATA"
    # src/prunelab/bench/text.py -> parents[3] is the checkout, parents[4] holds shared/
    return [Path(__file__).resolve().parents[4] / "shared" / "data"], "the default ../shared/data"


def find_tinyshakespeare(data_dir: str | os.PathLike | None = None) -> Path:
    """Path of ``input.txt``: ``<root>/tinyshakespeare/input.txt`` or ``<root>/input.txt``.

    ``root`` is ``data_dir``, else ``$PRUNELAB_DATA``, else ``../shared/data`` beside the
    checkout.  Raises :class:`PrunelabError` when neither file exists.
    """
    roots, origin = _default_roots(data_dir)
    for root in roots:
        for candidate in (root / SUBFOLDER / FILE_NAME, root / FILE_NAME):
            if candidate.is_file():
                return candidate
    root = os.fspath(roots[0])
    raise PrunelabError(
        f"tinyshakespeare not found: no {SUBFOLDER}/{FILE_NAME} or {FILE_NAME} in {root!r} (from {origin}); "
        f"pass --data-dir DIR or set PRUNELAB_DATA to the folder holding {SUBFOLDER}/{FILE_NAME}"
    )


@dataclass(frozen=True, eq=False)
class CharCorpus:
    """Tiny Shakespeare encoded as character ids (nanoGPT ``shakespeare_char``).

    ``chars`` is the sorted vocabulary (65 characters for the original file); ``train``
    and ``val`` are int64 tensors of ids, the first 90% / last 10% of ``text``.
    """

    text: str
    chars: str
    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64
    path: str
    sha256: str

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def n_train_chars(self) -> int:
        return int(self.train.numel())

    def encode(self, text: str) -> torch.Tensor:
        """Ids of ``text``; raises PrunelabError on a character outside the vocabulary."""
        index = {c: i for i, c in enumerate(self.chars)}
        try:
            return torch.tensor([index[c] for c in text], dtype=torch.long)
        except KeyError as exc:
            raise PrunelabError(
                f"character {exc.args[0]!r} is not in the tinyshakespeare vocabulary of {len(self.chars)} "
                "characters; use plain ASCII letters and punctuation"
            ) from None

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        values = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(self.chars[i] for i in values)

    def split(self, name: str) -> torch.Tensor:
        if name not in ("train", "val"):
            raise PrunelabError(f"unknown split {name!r}; expected 'train' or 'val'")
        return self.train if name == "train" else self.val


def load_tinyshakespeare(data_dir: str | os.PathLike | None = None) -> CharCorpus:
    """Read and encode tinyshakespeare (see :func:`find_tinyshakespeare` for the lookup)."""
    path = find_tinyshakespeare(data_dir)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PrunelabError(f"{os.fspath(path)}: not UTF-8 text ({exc.reason}); use the original tinyshakespeare input.txt") from None
    if len(text) < 1000:
        raise PrunelabError(
            f"{os.fspath(path)}: only {len(text)} characters, expected the ~1.1M-character tinyshakespeare "
            "input.txt; replace it with the original file"
        )
    chars = "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)  # (N,)
    n_train = int(len(ids) * TRAIN_FRACTION)
    return CharCorpus(text=text, chars=chars, train=ids[:n_train], val=ids[n_train:], path=os.fspath(path),
                      sha256=hashlib.sha256(raw).hexdigest())


# --- batches ------------------------------------------------------------------------------
def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrunelabError(f"{name} must be a positive integer, got {value!r}")


def get_batch(data: torch.Tensor, batch_size: int, block_size: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows ``(x, y)`` of ``data``, ``y`` shifted by one (nanoGPT ``get_batch``).

    Both are ``(batch_size, block_size)`` int64; offsets come from ``generator`` only.

    Known off-by-one, kept on purpose: start offsets are drawn uniformly from
    ``0 .. len(data) - block_size - 2`` (``torch.randint(len(data) - block_size - 1)``),
    so the last valid window -- start ``len(data) - block_size - 1``, whose target ends
    on the split's last character -- is never drawn, and ``data`` needs at least
    ``block_size + 2`` characters.  nanoGPT draws from ``randint(len(data) - block_size)``.
    Changing it would change every batch stream, hence the cached trained char-GPT and
    the benchmark records built on it.
    """
    _check_positive("batch_size", batch_size)
    _check_positive("block_size", block_size)
    if data.numel() <= block_size + 1:
        raise PrunelabError(f"split of {data.numel()} characters is too short for block_size {block_size}")
    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)  # (B,)
    offsets = starts[:, None] + torch.arange(block_size)  # (B, T)
    return data[offsets], data[offsets + 1]


def train_batches(data: torch.Tensor, batch_size: int, block_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An endless, reproducible stream of :func:`get_batch` batches seeded by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield get_batch(data, batch_size, block_size, generator)


def calibration_sequences(corpus: CharCorpus, n_samples: int, block_size: int, seed: int = 0,
                          batch_size: int = 16) -> list[torch.Tensor]:
    """``n_samples`` random training windows of ``block_size`` ids, in batches of ``batch_size``.

    SparseGPT (Frantar & Alistarh 2023, sec. 4) and Wanda (Sun et al. 2024, sec. 4) calibrate
    on random segments of the training data; the windows here come from the training
    split only, so validation perplexity stays held out.  Returns ``(b, block_size)`` tensors.
    """
    _check_positive("calibration samples", n_samples)
    _check_positive("batch_size", batch_size)
    x, _ = get_batch(corpus.train, n_samples, block_size, torch.Generator().manual_seed(seed))  # (N, T)
    return list(x.split(batch_size))


def eval_windows(data: torch.Tensor, block_size: int, max_windows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive non-overlapping windows ``(x, y)``, each ``(W, block_size)``, from the start of ``data``.

    Window ``w`` reads ``data[w*T : (w+1)*T]`` and predicts ``data[w*T+1 : (w+1)*T+1]``
    (``T = block_size``), so each target character is scored at most once.  ``W`` is
    ``(len(data) - 1) // T`` (capped at ``max_windows``): the first character is never a
    target, and the tail of ``(len(data) - 1) % T`` characters that does not fill a whole
    window is not scored (51 characters of the Tiny Shakespeare validation split at
    ``T = 64``).  With ``max_windows`` only the first windows are used, not a sample of
    the whole split.
    """
    _check_positive("block_size", block_size)
    count = (data.numel() - 1) // block_size
    if max_windows is not None:
        _check_positive("max_windows", max_windows)
        count = min(count, max_windows)
    if count < 1:
        raise PrunelabError(f"split of {data.numel()} characters is too short for block_size {block_size}")
    x = data[: count * block_size].view(count, block_size)  # (W, T)
    y = data[1 : count * block_size + 1].view(count, block_size)  # (W, T)
    return x, y


# --- lines (for sentence embeddings) ------------------------------------------------------
def split_lines(corpus: CharCorpus, split: str) -> list[str]:
    """Distinct, stripped, non-empty lines of one split, in order of first appearance.

    A line cut by the 90/10 boundary (characters of it on both sides) is dropped from
    both splits; when the boundary falls between lines, no line is dropped.
    """
    cut = corpus.n_train_chars
    text = corpus.text
    line_is_cut = 0 < cut < len(text) and text[cut - 1] not in "\r\n" and text[cut] not in "\r\n"
    if split == "train":
        text = text[:cut]
        if line_is_cut:
            text = text.rsplit("\n", 1)[0] if "\n" in text else ""
    elif split == "val":
        text = text[cut:]
        if line_is_cut:
            text = text.split("\n", 1)[1] if "\n" in text else ""
    else:
        raise PrunelabError(f"unknown split {split!r}; expected 'train' or 'val'")
    return list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))


def calibration_lines(corpus: CharCorpus, n: int, seed: int = 0) -> list[str]:
    """``n`` distinct training-split lines drawn at random (seeded) for calibration."""
    _check_positive("calibration samples", n)
    lines = split_lines(corpus, "train")
    if n > len(lines):
        raise PrunelabError(f"asked for {n} calibration lines but the training split has {len(lines)}; use fewer")
    order = torch.randperm(len(lines), generator=torch.Generator().manual_seed(seed))[:n]
    return [lines[i] for i in order.tolist()]


def held_out_lines(corpus: CharCorpus, n: int, exclude: Sequence[str] = ()) -> list[str]:
    """The first ``n`` distinct validation-split lines that occur nowhere in the training split.

    Lines in ``exclude`` (e.g. the calibration lines) are skipped too, so the evaluation
    set never overlaps calibration.  Raises PrunelabError when fewer than ``n`` exist.
    """
    _check_positive("held-out lines", n)
    seen = set(split_lines(corpus, "train")) | set(exclude)
    lines = [line for line in split_lines(corpus, "val") if line not in seen]
    if n > len(lines):
        raise PrunelabError(f"asked for {n} held-out lines but the validation split has {len(lines)} unseen ones; use fewer")
    return lines[:n]
