"""Tanaka et al. 2020, Figure 1/6: layer collapse of pruning-at-init criteria on LeNet-300-100 (MNIST).

Tanaka, Kunin, Yamins & Ganguli, "Pruning neural networks without any data by iteratively
conserving synaptic flow", NeurIPS 2020: at high compression, single-shot criteria with a
global threshold prune whole layers away (*layer collapse*) and the network drops to
chance, while iterative SynFlow keeps every layer and stays above chance up to the
maximal compression.  Target: SynFlow never fully cuts a layer or leaves no input-output
path for compression ratios 10^0 .. 10^3.5 (step 10^0.25) and stays above chance (11.35%,
the most frequent MNIST test class) wherever another criterion collapses.

Each point prunes a freshly initialised LeNet-300-100 to ``1 / ratio`` of its 266,200
weights with one global threshold: random, magnitude, SNIP and GraSP in one shot
(SNIP/GraSP on 8 training batches of 128; GraSP with the authors' temperature 200),
SynFlow in 100 rounds keeping ``ratio^(-k/100)`` after round k.  It then trains 3 epochs
(SGD, momentum 0.9, lr 0.1, weight decay 1e-4, cosine) with the masks fixed, and records
the test accuracy, whether a layer keeps no weight, and whether any input-output path
survives.  Every point is run for seeds 0, 1 and 2 (initialisation, score batches and
training order); the table gives the mean and std of the accuracy over the seeds and on
how many seeds a layer was fully cut or no path survived, the per-seed rows are in the
record's ``seed_rows``.  The targets are judged on every (seed, ratio): SynFlow must not
collapse on any, and its lowest accuracy at the points where another criterion collapsed
on the same seed must be above chance, and the slowest seed must take <= 900 s.  The
record of 2026-12-01 took 505-685 s per seed (29 minutes for the three) on one thread of a
CPU shared with other jobs.

    python benchmarks/layer_collapse.py            # writes benchmarks/results/layer_collapse.{json,png}
    python benchmarks/layer_collapse.py --quick    # seed 0, 3 ratios, 1 epoch
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

from prunelab.bench.datasets import load_dataset, make_loaders
from prunelab.bench.models import build_model
from prunelab.bench.plots import plot_axes
from prunelab.bench.records import (
    benchmark_args, benchmark_environment, publish, resolve_data_dir, run_guarded, target,
)
from prunelab.bench.recipes import LENET300_DENSE
from prunelab.bench.training import seed_everything
from prunelab.masks import MaskSet
from prunelab.methods import PruneSpec
from prunelab.methods.pai import run_grasp, run_pai, run_snip, run_synflow

EPOCHS = 3
EXPONENTS = tuple(k / 4 for k in range(15))  # ratio = 10^0, 10^0.25, ..., 10^3.5
QUICK_EXPONENTS = (0.0, 1.5, 3.5)
CRITERIA = {  # label -> (runner, criterion for run_pai)
    "random": (run_pai, "random"),
    "magnitude": (run_pai, "magnitude"),
    "SNIP": (run_snip, "snip"),
    "GraSP": (run_grasp, "grasp"),
    "SynFlow": (run_synflow, "synflow"),
}
CHANCE_PCT = 11.35  # the most frequent class of the MNIST test set (digit 1)
LAYERS = ("fc1.weight", "fc2.weight", "fc3.weight")
SEEDS = (0, 1, 2)
SECONDS_PER_SEED = 900  # wall-time budget of one seed's 75 points


def connected(masks: MaskSet, order=LAYERS) -> bool:
    """Whether some path of kept weights joins an input pixel to an output logit (sequential MLP)."""
    alive = torch.ones(masks[order[0]].shape[1], dtype=torch.bool)  # (in_features,)
    for name in order:
        alive = masks[name][:, alive].any(dim=1)  # (out_features,): units reached from the input
    return bool(alive.any())


def run_point(splits, label: str, exponent: float, config) -> dict:
    runner, criterion = CRITERIA[label]
    ratio = 10.0 ** exponent
    seed_everything(config.seed)
    model = build_model("lenet300", splits.input_shape, splits.num_classes)
    train_loader, test_loader = make_loaders(splits, config.batch_size, config.seed)
    spec = PruneSpec(sparsity=1.0 - 1.0 / ratio, criterion=criterion, allocation="global", score_batches=8)
    started = time.perf_counter()
    result = runner(model, train_loader, test_loader, spec, config)
    stats = result.masks.stats()
    layers = {l.name: l.kept for l in stats.layers}
    return {
        "method": label, "seed": config.seed, "log10_compression": exponent, "compression_x": stats.total / max(stats.kept, 1),
        "kept_weights": stats.kept, "accuracy_pct": 100.0 * result.rows[-1]["accuracy"],
        "collapsed_layers": sum(1 for k in layers.values() if k == 0), "connected": int(connected(result.masks)),
        **{f"kept_{n.split('.')[0]}": layers[n] for n in LAYERS},
        "wall_time_s": time.perf_counter() - started,
    }


def collapsed(row: dict) -> bool:
    """A layer keeps no weight, or no input-output path survives."""
    return bool(row["collapsed_layers"]) or not row["connected"]


def aggregate(seed_rows: list[dict], exponents, seeds) -> list[dict]:
    """One row per (criterion, ratio): accuracy mean/std over seeds and how many seeds collapsed."""
    rows = []
    for exponent in exponents:
        for label in CRITERIA:
            parts = [r for r in seed_rows if r["method"] == label and r["log10_compression"] == exponent]
            accuracy = [r["accuracy_pct"] for r in parts]
            rows.append({
                "method": label, "log10_compression": exponent,
                "kept_weights": round(statistics.fmean(r["kept_weights"] for r in parts)),
                "accuracy_pct": statistics.fmean(accuracy),
                "accuracy_std_pct": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
                "seeds_layer_cut": sum(1 for r in parts if r["collapsed_layers"]),
                "seeds_disconnected": sum(1 for r in parts if not r["connected"]),
                "seeds": len(parts),
                **{f"kept_{n.split('.')[0]}": round(statistics.fmean(r[f"kept_{n.split('.')[0]}"] for r in parts))
                   for n in LAYERS},
            })
    return rows


def plot(rows: list[dict], path: Path, seeds) -> None:
    with plot_axes(path, figsize=(7, 4.5)) as ax:
        for label in CRITERIA:
            mine = [r for r in rows if r["method"] == label]
            line = ax.errorbar([r["log10_compression"] for r in mine], [r["accuracy_pct"] for r in mine],
                               yerr=[r["accuracy_std_pct"] for r in mine], marker="o", capsize=3, label=label)
            cut = [r for r in mine if r["seeds_layer_cut"]]
            ax.scatter([r["log10_compression"] for r in cut], [r["accuracy_pct"] for r in cut], marker="x", s=90,
                       color=line[0].get_color(), zorder=5)
        ax.axhline(CHANCE_PCT, color="grey", linestyle="--", label="chance (majority class)")
        ax.set_xlabel("compression ratio (log10): total / kept weights")
        ax.set_ylabel(f"test accuracy (%), mean +- std over {len(seeds)} seed(s)")
        ax.set_title("LeNet-300-100 / MNIST pruned at init; x = a layer fully cut on some seed")
        ax.legend()


def main(argv=None) -> int:
    parser = benchmark_args(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    quick = args.quick
    started = time.perf_counter()
    splits = load_dataset("mnist", resolve_data_dir(args.data_dir))
    base = dataclasses.replace(LENET300_DENSE, epochs=1 if quick else EPOCHS, seed=0, progress=False)
    exponents = QUICK_EXPONENTS if quick else EXPONENTS
    seeds = SEEDS[:1] if quick else SEEDS

    seed_rows, seed_time = [], {}
    for seed in seeds:
        config = dataclasses.replace(base, seed=seed)
        seed_started = time.perf_counter()
        for exponent in exponents:
            for label in CRITERIA:
                row = run_point(splits, label, exponent, config)
                seed_rows.append(row)
                print(f"seed {seed} 10^{exponent:.2f} {label}: accuracy {row['accuracy_pct']:.2f}% kept "
                      f"{row['kept_fc1']}/{row['kept_fc2']}/{row['kept_fc3']} "
                      f"{'COLLAPSED ' if collapsed(row) else ''}({row['wall_time_s']:.0f} s)", flush=True)
        seed_time[seed] = time.perf_counter() - seed_started

    total = time.perf_counter() - started
    rows = aggregate(seed_rows, exponents, seeds)
    synflow = {(r["seed"], r["log10_compression"]): r for r in seed_rows if r["method"] == "SynFlow"}
    collapse_points = sorted({(r["seed"], r["log10_compression"]) for r in seed_rows
                              if r["method"] != "SynFlow" and collapsed(r)})
    synflow_collapses = sum(1 for r in synflow.values() if collapsed(r))
    worst = min((synflow[p]["accuracy_pct"] for p in collapse_points), default=None)
    slowest = max(seed_time.values())
    targets = [
        target(f"SynFlow (seed, ratio) points with a fully cut layer or no input-output path ({len(synflow)} points)",
               synflow_collapses, "== 0", synflow_collapses == 0),
        target("SynFlow min accuracy where another criterion collapses on the same seed (%)",
               None if worst is None else round(worst, 2), f"> {CHANCE_PCT} (chance)",
               worst is not None and worst > CHANCE_PCT),
        target("wall time of the slowest seed (s)", round(slowest, 1), f"<= {SECONDS_PER_SEED}",
               slowest <= SECONDS_PER_SEED),
    ]
    columns = [("method", "method"), ("log10_compression", "log10 ratio"), ("kept_weights", "kept"),
               ("accuracy_pct", "accuracy %"), ("accuracy_std_pct", "std"), ("seeds_layer_cut", "seeds: layer cut"),
               ("seeds_disconnected", "seeds: no path"), ("kept_fc1", "fc1 kept"), ("kept_fc2", "fc2 kept"),
               ("kept_fc3", "fc3 kept")]
    record = {
        "config": {"train": dataclasses.asdict(base) | {"seed": list(seeds)}, "log10_ratios": list(exponents),
                   "allocation": "global", "synflow_rounds": 100, "score_batches": 8, "grasp_temperature": 200,
                   "quick": quick},
        "seeds": list(seeds),
        "environment": benchmark_environment(),
        "columns": columns,
        "rows": rows,
        "seed_rows": seed_rows,
        "collapse_points_seed_log10": [list(p) for p in collapse_points],
        "targets": targets,
        "seed_wall_time_s": {str(s): t for s, t in seed_time.items()},
        "total_wall_time_s": total,
    }
    publish("layer_collapse", record, args.out, plot=lambda png: plot(rows, png, seeds))
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
