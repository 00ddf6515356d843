"""Tanaka et al. 2020, Figure 1/6: layer collapse of pruning-at-init criteria on LeNet-300-100 (MNIST).

Tanaka, Kunin, Yamins & Ganguli, "Pruning neural networks without any data by iteratively
conserving synaptic flow", NeurIPS 2020: at high compression, single-shot criteria with a
global threshold prune whole layers away (*layer collapse*) and the network drops to
chance, while iterative SynFlow keeps every layer and stays above chance up to the
maximal compression.  Target: SynFlow never fully cuts a layer for compression ratios
10^0 .. 10^3.5 (step 10^0.25) and stays above chance (11.35%, the most frequent MNIST
test class) wherever another criterion collapses.

Each point prunes a freshly initialised LeNet-300-100 (seed 0) to ``1 / ratio`` of its
266,200 weights with one global threshold: random, magnitude, SNIP and GraSP in one shot
(SNIP/GraSP on 8 training batches of 128; GraSP with the authors' temperature 200),
SynFlow in 100 rounds keeping ``ratio^(-k/100)`` after round k.  It then trains 3 epochs
(SGD, momentum 0.9, lr 0.1, weight decay 1e-4, cosine) with the masks fixed, and records
the test accuracy, whether a layer keeps no weight, and whether any input-output path
survives.  About 6-7 minutes on a free 2-core CPU (387 s in the record).

    python benchmarks/layer_collapse.py            # writes benchmarks/results/layer_collapse.{json,png}
    python benchmarks/layer_collapse.py --quick    # 3 ratios, 1 epoch
"""

from __future__ import annotations

import dataclasses
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
        "method": label, "log10_compression": exponent, "compression_x": stats.total / max(stats.kept, 1),
        "kept_weights": stats.kept, "accuracy_pct": 100.0 * result.rows[-1]["accuracy"],
        "collapsed_layers": sum(1 for k in layers.values() if k == 0), "connected": int(connected(result.masks)),
        **{f"kept_{n.split('.')[0]}": layers[n] for n in LAYERS},
        "wall_time_s": time.perf_counter() - started,
    }


def plot(rows: list[dict], path: Path) -> None:
    with plot_axes(path, figsize=(7, 4.5)) as ax:
        for label in CRITERIA:
            mine = [r for r in rows if r["method"] == label]
            line, = ax.plot([r["log10_compression"] for r in mine], [r["accuracy_pct"] for r in mine], marker="o",
                            label=label)
            cut = [r for r in mine if r["collapsed_layers"]]
            ax.scatter([r["log10_compression"] for r in cut], [r["accuracy_pct"] for r in cut], marker="x", s=90,
                       color=line.get_color(), zorder=5)
        ax.axhline(CHANCE_PCT, color="grey", linestyle="--", label="chance (majority class)")
        ax.set_xlabel("compression ratio (log10): total / kept weights")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("LeNet-300-100 / MNIST pruned at init; x = a layer fully cut")
        ax.legend()


def main(argv=None) -> int:
    parser = benchmark_args(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    quick = args.quick
    started = time.perf_counter()
    splits = load_dataset("mnist", resolve_data_dir(args.data_dir))
    config = dataclasses.replace(LENET300_DENSE, epochs=1 if quick else EPOCHS, seed=0, progress=False)
    exponents = QUICK_EXPONENTS if quick else EXPONENTS

    rows = []
    for exponent in exponents:
        for label in CRITERIA:
            row = run_point(splits, label, exponent, config)
            rows.append(row)
            print(f"10^{exponent:.2f} {label}: accuracy {row['accuracy_pct']:.2f}% kept "
                  f"{row['kept_fc1']}/{row['kept_fc2']}/{row['kept_fc3']} "
                  f"{'COLLAPSED ' if row['collapsed_layers'] else ''}({row['wall_time_s']:.0f} s)")

    total = time.perf_counter() - started
    synflow = {r["log10_compression"]: r for r in rows if r["method"] == "SynFlow"}
    collapse_points = sorted({r["log10_compression"] for r in rows
                              if r["method"] != "SynFlow" and (r["collapsed_layers"] or not r["connected"])})
    synflow_collapses = sum(1 for r in synflow.values() if r["collapsed_layers"] or not r["connected"])
    worst = min((synflow[e]["accuracy_pct"] for e in collapse_points), default=None)
    targets = [
        target("SynFlow ratios with a fully cut layer or no input-output path", synflow_collapses, "== 0",
               synflow_collapses == 0),
        target("SynFlow min accuracy where another criterion collapses (%)",
               None if worst is None else round(worst, 2), f"> {CHANCE_PCT} (chance)",
               worst is not None and worst > CHANCE_PCT),
        target("total wall time (s)", round(total, 1), "<= 900", total <= 900),
    ]
    columns = [("method", "method"), ("log10_compression", "log10 ratio"), ("kept_weights", "kept"),
               ("accuracy_pct", "accuracy %"), ("collapsed_layers", "layers cut"), ("connected", "connected"),
               ("kept_fc1", "fc1 kept"), ("kept_fc2", "fc2 kept"), ("kept_fc3", "fc3 kept"), ("wall_time_s", "wall s")]
    record = {
        "config": {"train": dataclasses.asdict(config), "log10_ratios": list(exponents), "allocation": "global",
                   "synflow_rounds": 100, "score_batches": 8, "grasp_temperature": 200, "quick": quick},
        "seeds": [config.seed],
        "environment": benchmark_environment(),
        "columns": columns,
        "rows": rows,
        "collapse_points_log10": collapse_points,
        "targets": targets,
        "total_wall_time_s": total,
    }
    publish("layer_collapse", record, args.out, plot=lambda png: plot(rows, png))
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
