"""A character-level GPT on Tiny Shakespeare: model, training, cached checkpoint.

The model is nanoGPT's ``model.py`` (Karpathy, https://github.com/karpathy/nanoGPT) cut
down to ~0.82M parameters: pre-LayerNorm transformer blocks (Radford et al. 2019, GPT-2)
of causal self-attention (Vaswani et al. 2017) and a 4x GELU MLP, learned position
embeddings, an untied ``lm_head`` without bias.  Linear layers keep nanoGPT's names
(``blocks.{i}.attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``) inside
``blocks: nn.ModuleList`` of :class:`Block`, so one-shot pruners find the blocks as the
longest ModuleList and leave ``lm_head`` dense.

Training follows nanoGPT's ``train.py``: AdamW (Loshchilov & Hutter 2019) with weight decay
on matrices only, linear warm-up then cosine decay (Loshchilov & Hutter 2017), gradient
clipping at 1.0, random windows of the training split.

:func:`load_or_train_chargpt` trains once and caches ``model.safetensors`` + ``config.json``
(nanoGPT's ``model_args`` plus the training config and its sha256) in
``$PRUNELAB_CACHE/chargpt/<sha>`` (default ``~/.cache/prunelab/chargpt/<sha>``); the
folder name is the first 12 hex digits of the sha of the training config and the corpus,
so a different recipe or corpus never reuses a stale model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.bench.text import (
    CharCorpus,
    eval_windows,
    get_batch,
    load_tinyshakespeare,
    train_batches,
)
from prunelab.errors import PrunelabError
from prunelab.io import atomic_dir, write_json

__all__ = [
    "Block", "CharGPT", "CharGPTConfig", "CharGPTTrainConfig", "chargpt_cache_root", "evaluate_loss",
    "load_chargpt", "load_or_train_chargpt", "save_chargpt", "train_chargpt",
]

CHECKPOINT_FORMAT = "prunelab.chargpt.v1"


@dataclass(frozen=True)
class CharGPTConfig:
    """Architecture (nanoGPT ``GPTConfig`` / ``model_args``); stored with every checkpoint."""

    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PrunelabError(f"CharGPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise PrunelabError(
                f"CharGPTConfig: n_embd {self.n_embd} is not divisible by n_head {self.n_head}; "
                "pick n_embd as a multiple of n_head"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise PrunelabError(f"CharGPTConfig.dropout must be in [0, 1), got {self.dropout!r}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (nanoGPT ``CausalSelfAttention``)."""

    def __init__(self, config: CharGPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # (B, T, C)
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


class MLP(nn.Module):
    """Position-wise feed-forward: Linear 4C -> GELU -> Linear C (nanoGPT ``MLP``)."""

    def __init__(self, config: CharGPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gelu(self.c_fc(x))  # (B, T, 4C)
        return self.dropout(self.c_proj(x))  # (B, T, C)


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: CharGPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class CharGPT(nn.Module):
    """nanoGPT's GPT for characters: ``forward(idx (B, T)) -> logits (B, T, vocab_size)``.

    Parameters are initialised as in nanoGPT (normal 0.02; residual projections scaled by
    ``1/sqrt(2 n_layer)``, GPT-2 sec. 2.3) from a local generator seeded by ``seed``, so
    building a model never touches the global RNG.
    """

    def __init__(self, config: CharGPTConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        with torch.random.fork_rng(devices=[]):  # the default inits below draw from the global RNG; restore it
            self.wte = nn.Embedding(config.vocab_size, config.n_embd)
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
            self.drop = nn.Dropout(config.dropout)
            self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
            self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self._init_weights(seed)

    @torch.no_grad()
    def _init_weights(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                param.normal_(0.0, residual_std, generator=generator)
            elif name.endswith(".bias"):
                param.zero_()
            elif param.dim() >= 2:  # Linear and Embedding matrices
                param.normal_(0.0, 0.02, generator=generator)
            # LayerNorm weights keep their default of 1

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]  # idx: (B, T)
        if T > self.config.block_size:
            raise PrunelabError(
                f"sequence of {T} tokens is longer than block_size {self.config.block_size}; crop the input"
            )
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab_size)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-character cross-entropy of ``logits (B, T, V)`` against ``targets (B, T)``."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


@torch.no_grad()
def evaluate_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 128) -> dict[str, float]:
    """Mean token loss (nats) and perplexity ``exp(loss)`` of ``model`` on windows ``x, y (W, T)``."""
    if y.numel() == 0:
        raise PrunelabError(f"evaluate_loss got no tokens (windows of shape {tuple(y.shape)}); "
                            "pass at least one window")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            logits = model(xb)  # (b, T, V)
            total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), yb.reshape(-1), reduction="sum"))
            count += yb.numel()
    finally:
        model.train(was_training)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss)}


# --- training -----------------------------------------------------------------------------
@dataclass(frozen=True)
class CharGPTTrainConfig:
    """The training recipe (nanoGPT ``train.py`` knobs); its sha256 names the cache folder.

    The defaults are nanoGPT's CPU recipe from its README ("baby GPT" on shakespeare_char:
    4 layers, 4 heads, 128 wide, block 64, dropout 0, lr 1e-3 -> 1e-4 cosine over 2000
    iterations, warm-up 100, beta2 0.99; ~1.88 val loss at batch 12) with batch 32.
    """

    model: CharGPTConfig = field(default_factory=CharGPTConfig)
    iters: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    weight_decay: float = 0.1
    beta2: float = 0.99
    grad_clip: float = 1.0
    seed: int = 0
    eval_windows: int = 512

    def __post_init__(self) -> None:
        for name in ("iters", "batch_size", "eval_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PrunelabError(f"CharGPTTrainConfig.{name} must be a positive integer, got {value!r}")
        if not 0 <= self.warmup_iters < self.iters:
            raise PrunelabError(
                f"CharGPTTrainConfig.warmup_iters {self.warmup_iters} must be in [0, iters={self.iters})"
            )

    @classmethod
    def quick(cls) -> CharGPTTrainConfig:
        """A 200-iteration, batch-16 recipe for smoke runs (far from converged)."""
        return cls(iters=200, batch_size=16, warmup_iters=20, eval_windows=128)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self, corpus_sha256: str) -> str:
        """sha256 of this recipe and the corpus: the cache key."""
        payload = json.dumps({"format": CHECKPOINT_FORMAT, "train": self.to_dict(), "corpus": corpus_sha256},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def lr_at(self, it: int) -> float:
        """nanoGPT ``get_lr``: linear warm-up, then cosine decay from ``lr`` to ``min_lr``."""
        if it < self.warmup_iters:
            return self.lr * (it + 1) / (self.warmup_iters + 1)
        ratio = (it - self.warmup_iters) / max(1, self.iters - self.warmup_iters)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (self.lr - self.min_lr)


def train_chargpt(corpus: CharCorpus, config: CharGPTTrainConfig, progress: bool = True) -> tuple[CharGPT, dict[str, Any]]:
    """Train a fresh :class:`CharGPT` on ``corpus.train``; returns the model (eval mode) and metrics."""
    from prunelab.progress import progress_bar

    if config.model.vocab_size != corpus.vocab_size:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=corpus.vocab_size))
    model = CharGPT(config.model, seed=config.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=config.lr, betas=(0.9, config.beta2))
    batches = train_batches(corpus.train, config.batch_size, config.model.block_size, config.seed)
    started = time.perf_counter()
    model.train()
    running = None
    # a bar on a terminal, a few plain lines in a log (no '\r')
    bar = progress_bar(config.iters, "train char-GPT", progress, mininterval=1.0)
    # dropout draws from the global RNG: seed a private copy of it so that the recipe (and so the
    # cache key) fixes the model, and the caller's RNG state is left as it was
    with torch.random.fork_rng(devices=[]), contextlib.closing(bar):
        torch.manual_seed(config.seed)
        for it in range(config.iters):
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(it)
            x, y = next(batches)  # (B, T), (B, T)
            loss = lm_loss(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            value = loss.item()
            running = value if running is None else 0.95 * running + 0.05 * value
            if it % 50 == 0:
                bar.set_postfix(loss=f"{running:.3f}", refresh=False)
            bar.update(1)
    train_time = time.perf_counter() - started
    model.eval()
    val = evaluate_loss(model, *eval_windows(corpus.val, config.model.block_size, config.eval_windows))
    train_x, train_y = get_batch(corpus.train, config.eval_windows, config.model.block_size,
                                 torch.Generator().manual_seed(config.seed + 1))
    train = evaluate_loss(model, train_x, train_y)
    metrics = {"train_loss": train["loss"], "val_loss": val["loss"], "val_perplexity": val["perplexity"],
               "train_time_s": train_time, "iters": config.iters, "threads": torch.get_num_threads()}
    return model, metrics


# --- checkpoints ----------------------------------------------------------------------------
def save_chargpt(model: CharGPT, folder: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (``model_args`` + ``meta``) into an existing folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": CHECKPOINT_FORMAT})
    write_json(folder / "config.json", {"format": CHECKPOINT_FORMAT, "model_args": dataclasses.asdict(model.config),
                                        **(meta or {})})
    return folder


def load_chargpt(folder: str | os.PathLike) -> tuple[CharGPT, dict[str, Any]]:
    """Rebuild a :class:`CharGPT` from ``folder/config.json`` and load ``folder/model.safetensors``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise PrunelabError(
            f"{os.fspath(folder)!r} is not a char-GPT checkpoint (expected config.json and model.safetensors); "
            "pass a folder written by save_chargpt or `prunelab oneshot --model chargpt`"
        )
    try:
        meta = json.loads(config_path.read_text())
        config = CharGPTConfig(**meta["model_args"])
        state = load_file(str(weights_path))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise PrunelabError(f"cannot read the char-GPT checkpoint in {os.fspath(folder)!r} ({exc}); delete it and re-train") from None
    model = CharGPT(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise PrunelabError(f"{os.fspath(weights_path)!r} does not match its config.json ({first}); delete the folder and re-train") from None
    return model.eval(), meta


def chargpt_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$PRUNELAB_CACHE/chargpt``, else ``$XDG_CACHE_HOME`` or ``~/.cache`` + ``/prunelab/chargpt``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("PRUNELAB_CACHE"):
        return Path(os.environ["PRUNELAB_CACHE"]).expanduser() / "chargpt"
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(root) / "prunelab" / "chargpt"


_CACHE_FILES = ("config.json", "model.safetensors")


def _discard_cache_entry(folder: Path) -> None:
    """Empty an unreadable cache folder so :func:`atomic_dir` may replace it.

    A damaged ``config.json`` no longer shows that prunelab wrote the folder, so the
    cache's own files are removed first -- only when the folder holds nothing else.
    """
    entries = [p for p in folder.iterdir()]
    if all(p.name in _CACHE_FILES and p.is_file() for p in entries):
        for path in entries:
            path.unlink(missing_ok=True)


def load_or_train_chargpt(data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                          quick: bool = False, progress: bool = True, *,
                          train_config: CharGPTTrainConfig | None = None) -> tuple[CharGPT, dict[str, Any]]:
    """The trained char-GPT from the cache, training (and caching) it first when missing.

    ``quick`` picks :meth:`CharGPTTrainConfig.quick`; ``train_config`` overrides both.
    The cache folder is ``chargpt_cache_root(cache_dir) / sha[:12]`` where ``sha`` hashes
    the recipe and the corpus; it is written atomically.  ``meta`` holds ``model_args``,
    the recipe, its ``sha256``, the metrics (val loss, training time), the folder and
    ``cached`` (True when nothing was trained).
    """
    corpus = load_tinyshakespeare(data_dir)
    config = train_config or (CharGPTTrainConfig.quick() if quick else CharGPTTrainConfig())
    if config.model.vocab_size != corpus.vocab_size:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=corpus.vocab_size))
    sha = config.digest(corpus.sha256)
    folder = chargpt_cache_root(cache_dir) / sha[:12]
    if folder.is_dir():
        try:
            model, meta = load_chargpt(folder)
        except PrunelabError as exc:  # a damaged or half-deleted cache entry: train again and replace it
            if progress:
                print(f"note: ignoring the char-GPT cache in {os.fspath(folder)} ({exc})")
            _discard_cache_entry(folder)
        else:
            if meta.get("sha256") == sha and meta.get("model_args") == dataclasses.asdict(config.model):
                return model, {**meta, "folder": os.fspath(folder), "cached": True}
    if progress:
        print(f"training the char-GPT ({config.iters} iterations) and caching it in {os.fspath(folder)}")
    model, metrics = train_chargpt(corpus, config, progress=progress)
    meta = {"sha256": sha, "train_config": config.to_dict(), "corpus_sha256": corpus.sha256, "metrics": metrics}
    with atomic_dir(folder) as tmp:
        save_chargpt(model, tmp, meta)
    return model, {**meta, "model_args": dataclasses.asdict(model.config), "format": CHECKPOINT_FORMAT,
                   "folder": os.fspath(folder), "cached": False}
