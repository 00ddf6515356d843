"""Attention-head pruning without retraining: Michel et al. 2019 importance vs magnitude vs random.

Michel, Levy & Neubig 2019, "Are Sixteen Heads Really Better than One?" (NeurIPS):
sec. 4, Figure 3 -- a large share of a trained transformer's heads can be removed at test
time, with no retraining, before accuracy drops sharply (about 20% on WMT, 40% on BERT),
and the gate-gradient importance ``I_h = E |dL/dxi_h|`` removes them in a better order
than chance.  This script repeats the experiment on the bench zoo's RowTransformer
(:mod:`prunelab.bench.row_transformer`: 2 blocks x 8 heads, dim 64, MNIST rows as tokens),
trained briefly with AdamW.

For each share of the 16 heads removed (25 ... 87.5%, one global ranking, at least one
head per block), three scores choose the heads: ``importance``
(:func:`prunelab.heads.head_importance` on ``--score-batches`` training batches, normalised
per block as in the paper), ``magnitude`` (:func:`prunelab.heads.head_magnitude`) and
``random`` (three seeds, mean).  Test error is measured on the masked model.  The 50%
importance-pruned model is then physically shrunk (:func:`shrink_model`: fewer heads,
smaller q/k/v/out projections) and compared with the masked one: max abs output
difference, parameters, Linear FLOPs, and latency at batch 64 (side by side, interleaved).

Michel et al. prune iteratively (10% of the heads at a time, re-scoring the pruned model);
measured here (2026-12-01, same model) with the importance re-scored every 10% and pruned
heads kept out of the ranking, test error at 25/50/62.5/75/87.5% was 2.60/12.89/25.19/40.32/
69.89% against the single scoring's 2.60/11.31/19.56/41.12/60.58%, so the script scores once.

Targets: importance pruning of 25% of the heads raises test error by at most 1 point;
at every share >= 50%, importance is no worse than random (mean of 3 seeds); the shrunk
model matches the masked one (max abs error <= 1e-4).

    python benchmarks/head_pruning.py           # writes benchmarks/results/head_pruning.{json,png}
    python benchmarks/head_pruning.py --quick   # 1 epoch on 5,000 images: checks the script works
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import sys
import time

import torch
from torch.utils.data import Subset

from prunelab.bench.datasets import DatasetSplits, load_dataset, make_loaders
from prunelab.bench.plots import plot_axes
from prunelab.bench.records import (
    benchmark_args, benchmark_environment, publish, resolve_data_dir, run_guarded, target,
)
from prunelab.bench.row_transformer import RowTransformer
from prunelab.bench.training import TrainConfig, evaluate, seed_everything, train
from prunelab.heads import head_importance, head_magnitude, head_masks
from prunelab.materialise.shrink import shrink_model
from prunelab.measure import measure_model
from prunelab.measure.latency import model_latency_ms

TRAIN = TrainConfig(epochs=4, batch_size=128, optimizer="adamw", lr=2e-3, momentum=0.9, weight_decay=0.01,
                    lr_schedule="cosine", seed=0, progress=False)
SHARES = (0.25, 0.5, 0.625, 0.75, 0.875)
RANDOM_SEEDS = (0, 1, 2)
COLUMNS = [("pruned_pct", "heads pruned %"), ("heads_kept", "heads kept"), ("importance_error_pct", "importance err %"),
           ("magnitude_error_pct", "magnitude err %"), ("random_error_pct", "random err % (mean)"),
           ("random_std_pct", "random std")]


def error_with_heads(model, scores, share: float, test_loader) -> tuple[float, int]:
    choice = head_masks(model, scores, share)
    pruned = choice.masks.apply_(copy.deepcopy(model))
    kept = sum(int(k.sum()) for k in choice.keep.values())
    return evaluate(pruned, test_loader)["error_pct"], kept


def plot(rows: list[dict], dense_error: float, path) -> None:
    with plot_axes(path, figsize=(6, 4)) as ax:
        shares = [0.0] + [r["pruned_pct"] for r in rows]
        for key, label in (("importance_error_pct", "importance (Michel et al.)"), ("magnitude_error_pct", "magnitude"),
                           ("random_error_pct", "random (mean of 3)")):
            ax.plot(shares, [dense_error] + [r[key] for r in rows], marker="o", label=label)
        ax.set_xlabel("attention heads removed (%)")
        ax.set_ylabel("test error (%), no retraining")
        ax.set_yscale("log")
        ax.set_title("RowTransformer / MNIST: head pruning")
        ax.legend()


def main(argv=None) -> int:
    parser = benchmark_args(__doc__.splitlines()[0])
    parser.add_argument("--score-batches", type=int, default=20, help="training batches for the importance scores")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    splits = load_dataset("mnist", resolve_data_dir(args.data_dir))
    config = TRAIN
    if args.quick:
        config = dataclasses.replace(TRAIN, epochs=1)
        splits = DatasetSplits(Subset(splits.train, range(5000)), Subset(splits.test, range(2000)),  # type: ignore[arg-type]
                               splits.input_shape, splits.num_classes, splits.name)
    seed_everything(0)
    model = RowTransformer(splits.input_shape, splits.num_classes)
    train_loader, test_loader = make_loaders(splits, config.batch_size, 0)
    tick = time.perf_counter()
    train(model, train_loader, config, description="dense")
    train_s = time.perf_counter() - tick
    model.eval()
    dense_error = evaluate(model, test_loader)["error_pct"]
    print(f"RowTransformer: {sum(p.numel() for p in model.parameters()):,} parameters, dense test error "
          f"{dense_error:.2f}% after {config.epochs} epochs ({train_s:.0f} s)", flush=True)

    tick = time.perf_counter()
    importance = head_importance(model, train_loader, max_batches=args.score_batches)
    importance_s = time.perf_counter() - tick
    magnitude = head_magnitude(model)
    randoms = [{name: torch.rand(s.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
                for name, s in magnitude.items()} for seed in RANDOM_SEEDS]
    rows = []
    for share in SHARES:
        imp_error, kept = error_with_heads(model, importance, share, test_loader)
        mag_error, _ = error_with_heads(model, magnitude, share, test_loader)
        rand_errors = [error_with_heads(model, scores, share, test_loader)[0] for scores in randoms]
        rows.append({"pruned_pct": 100 * share, "heads_kept": kept, "importance_error_pct": imp_error,
                     "magnitude_error_pct": mag_error, "random_error_pct": statistics.fmean(rand_errors),
                     "random_std_pct": statistics.stdev(rand_errors), "random_errors_pct": rand_errors})
        print(f"{100 * share:5.1f}% heads pruned ({kept} kept): importance {imp_error:.2f}%, magnitude "
              f"{mag_error:.2f}%, random {statistics.fmean(rand_errors):.2f}%", flush=True)

    choice = head_masks(model, importance, 0.5)
    masked = choice.masks.apply_(copy.deepcopy(model)).eval()
    images = torch.stack([splits.test[i][0] for i in range(64)])  # (64, 1, 28, 28)
    shrunk = shrink_model(masked, choice.masks, images).eval()
    with torch.no_grad():
        max_error = float((shrunk(images) - masked(images)).abs().max())
    one = images[:1]
    dense_cost, shrunk_cost = measure_model(masked, one), measure_model(shrunk, one)
    latency = model_latency_ms({"dense": masked, "shrunk": shrunk}, images, 25)
    shrink_row = {"heads_kept": int(sum(int(k.sum()) for k in choice.keep.values())),
                  "params_dense": sum(p.numel() for p in masked.parameters()),
                  "params_shrunk": sum(p.numel() for p in shrunk.parameters()),
                  "linear_flop_ratio": shrunk_cost.dense_flops / dense_cost.dense_flops,
                  "latency_dense_ms": latency["dense"], "latency_shrunk_ms": latency["shrunk"],
                  "latency_ratio": latency["shrunk"] / latency["dense"], "max_abs_error": max_error,
                  "error_shrunk_pct": evaluate(shrunk, test_loader)["error_pct"]}
    print(f"shrunk at 50%: {shrink_row['params_shrunk']:,} / {shrink_row['params_dense']:,} parameters, latency x"
          f"{shrink_row['latency_ratio']:.2f} at batch 64, max abs error {max_error:.2e}", flush=True)

    at = {r["pruned_pct"]: r for r in rows}
    rise = at[25.0]["importance_error_pct"] - dense_error
    worse = [r["pruned_pct"] for r in rows if r["pruned_pct"] >= 50 and r["importance_error_pct"] > r["random_error_pct"]]
    total = time.perf_counter() - started
    targets = [
        target("importance: test error rise with 25% of heads removed (points)", round(rise, 3), "<= 1.0", rise <= 1.0),
        target("shares >= 50% where importance is worse than random (count)", len(worse), "= 0", not worse),
        target("shrunk vs masked max abs error", max_error, "<= 1e-4", max_error <= 1e-4),
        target("total wall time (s)", round(total, 1), "<= 900", total <= 900),
    ]
    record = {
        "config": {"train": dataclasses.asdict(config), "model": {"dim": 64, "heads": 8, "depth": 2, "mlp": 128},
                   "shares": list(SHARES), "score_batches": args.score_batches, "allocation": "global",
                   "min_heads": 1, "quick": args.quick},
        "seeds": [0], "random_seeds": list(RANDOM_SEEDS),
        "environment": benchmark_environment(),
        "columns": COLUMNS,
        "rows": rows,
        "reference_rows": [{"pruned_pct": 0.0, "heads_kept": 16, "importance_error_pct": dense_error,
                            "magnitude_error_pct": dense_error, "random_error_pct": dense_error}],
        "dense_error_pct": dense_error,
        "shrink": shrink_row,
        "notes": (f"Shrunk at 50% of heads (importance): {shrink_row['heads_kept']} heads kept, parameters "
                  f"{shrink_row['params_dense']:,} -> {shrink_row['params_shrunk']:,}, Linear FLOPs "
                  f"x{shrink_row['linear_flop_ratio']:.2f}, latency at batch 64 x{shrink_row['latency_ratio']:.2f} "
                  f"({shrink_row['latency_dense_ms']:.2f} -> {shrink_row['latency_shrunk_ms']:.2f} ms), test error "
                  f"{shrink_row['error_shrunk_pct']:.2f}%, max abs error vs masked {max_error:.1e}."
                  + ("" if rise <= 1.0 else
                     f" Removing 25% of the heads (importance order) costs {rise:.2f} points here, more than the 1-point "
                     "target: this model has 2 blocks of 8 heads of width 8, far less redundancy than the 6-layer WMT "
                     "and 12-layer BERT models of Michel et al., and nothing is retrained after pruning.")),
        "importance_scores": {name: s.tolist() for name, s in importance.items()},
        "importance_time_s": importance_s,
        "targets": targets,
        "total_wall_time_s": total,
    }
    publish("head_pruning", record, args.out, plot=lambda png: plot(rows, dense_error, png))
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
