"""Train the Tiny Shakespeare char-GPT once and cache it for the one-shot benchmarks.

The model and recipe are nanoGPT's "baby GPT" CPU configuration (Karpathy, nanoGPT
README, ``config/train_shakespeare_char.py`` with ``--n_layer=4 --n_head=4 --n_embd=128
--block_size=64 --dropout=0.0 --max_iters=2000``) at batch 32: AdamW, lr 1e-3 with 100
warm-up iterations and cosine decay to 1e-4.  nanoGPT reports ~1.88 validation loss at
batch 12; batch 32 aims at ~1.6-1.8.  See :mod:`prunelab.bench.chargpt`.

The checkpoint (``model.safetensors`` + ``config.json`` with ``model_args``, the recipe
and its sha256) goes to ``$PRUNELAB_CACHE/chargpt/<sha>`` (default
``~/.cache/prunelab/chargpt/<sha>``); nothing is trained when it is already there unless
``--force``.  Targets: validation loss <= 1.8 (full recipe only).

    python benchmarks/train_chargpt.py           # full recipe, a few minutes on 2 free cores
    python benchmarks/train_chargpt.py --quick   # 200 iterations, a smoke run
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from prunelab.bench.chargpt import (
    CharGPTTrainConfig,
    chargpt_cache_root,
    evaluate_loss,
    load_or_train_chargpt,
)
from prunelab.bench.records import (
    benchmark_args,
    benchmark_environment,
    resolve_data_dir,
    rows_table,
    run_guarded,
    target,
    targets_table,
    write_record,
)
from prunelab.bench.text import eval_windows, load_tinyshakespeare

COLUMNS = [("recipe", "recipe"), ("iters", "iterations"), ("batch_size", "batch"), ("params", "parameters"),
           ("train_loss", "train loss"), ("val_loss", "val loss"), ("val_ppl", "val ppl"),
           ("train_time_s", "train s")]


def main(argv=None) -> int:
    parser = benchmark_args(__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None, help="cache folder (default: $PRUNELAB_CACHE/chargpt or "
                        "~/.cache/prunelab/chargpt)")
    parser.add_argument("--force", action="store_true", help="re-train even when the cached model exists")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    data_dir = resolve_data_dir(args.data_dir)
    config = CharGPTTrainConfig.quick() if args.quick else CharGPTTrainConfig()
    if args.force:
        corpus = load_tinyshakespeare(data_dir)
        folder = chargpt_cache_root(args.cache_dir) / config.digest(corpus.sha256)[:12]
        if folder.is_dir():
            shutil.rmtree(folder)
    model, meta = load_or_train_chargpt(data_dir, args.cache_dir, quick=args.quick)
    metrics = dict(meta["metrics"])
    # the target is measured on the model as loaded now, never read back from the cache's stored metrics
    corpus = load_tinyshakespeare(data_dir)
    val = evaluate_loss(model, *eval_windows(corpus.val, config.model.block_size, config.eval_windows))
    metrics["val_loss"], metrics["val_perplexity"] = val["loss"], val["perplexity"]
    rows = [{"recipe": "quick" if args.quick else "full", "iters": metrics["iters"],
             "batch_size": meta["train_config"]["batch_size"], "params": model.num_params(),
             "train_loss": metrics["train_loss"], "val_loss": metrics["val_loss"],
             "val_ppl": metrics["val_perplexity"], "train_time_s": metrics["train_time_s"]}]
    targets = [] if args.quick else [target("validation loss (nats/char)", round(metrics["val_loss"], 4), "<= 1.8",
                                            metrics["val_loss"] <= 1.8)]
    record = {
        "config": {"train": meta["train_config"], "model_sha256": meta["sha256"], "quick": args.quick},
        "seeds": [meta["train_config"]["seed"]],
        "environment": benchmark_environment(),
        "columns": COLUMNS,
        "rows": rows,
        "targets": targets,
        "cache": {"folder": meta["folder"], "reused": meta["cached"]},
        "total_wall_time_s": time.perf_counter() - started,
    }
    out = write_record("train_chargpt", record, args.out)
    print(rows_table(rows, COLUMNS))
    if targets:
        print()
        print(targets_table(targets))
    reuse = "reused" if meta["cached"] else "trained and cached"
    print(f"\nmodel {reuse} in {Path(meta['folder'])}; record: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
