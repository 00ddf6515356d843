"""Lee et al. 2019, Table 1: SNIP on LeNet-300-100 (MNIST) at 95% and 98% sparsity, pruned at init.

Lee, Ajanthan & Torr, "SNIP: Single-shot Network Pruning based on Connection
Sensitivity", ICLR 2019, Table 1 (LeNet-300-100): 95.0% sparse -> 1.6% test error,
98.0% -> 2.4%.  Targets here: mean error over 3 seeds <= 1.7% at 95% and <= 2.4% at 98%.

Every run prunes a *freshly initialised* LeNet-300-100 once (global allocation over the
three weight matrices), then trains the sparse network from scratch with the masks held
fixed.  Compared, with the same training: SNIP (one training mini-batch for the connection
sensitivity), random pruning and magnitude at initialisation.  Two training recipes
(``--recipe``):

* ``lenet300`` (default): prunelab's LeNet-300-100 recipe (SGD, momentum 0.9, lr 0.1,
  weight decay 1e-4, batch 128, cosine decay) for 30 epochs, so 3 methods x 2 sparsities
  x 3 seeds fit in about 15 minutes on a free 2-core CPU.
* ``paper``: Lee et al. section 5 and their public code (namhoonlee/snip-public): batch
  100, weight decay 5e-4, lr 0.1 decayed by 0.1 every 25k iterations (42 epochs of 600
  iterations here), 125 epochs (75k iterations, three learning-rate phases); about 5 minutes
  per run, 90 minutes for the whole grid.  Measured with it on 2026-12-01 (seeds 0-2, SNIP
  only, outside the grid): 95% -> 1.90 +- 0.03% test error (1.87, 1.92, 1.91) and 98% -> 2.80 +- 0.16%
  (2.79, 2.96, 2.65), better than the default recipe's 2.18% and 3.20% but still above the
  paper's 1.6% and 2.4%.  Their code also draws weights from TensorFlow's default
  variance-scaling initialiser (a normal truncated at 2 sigma, std 1/sqrt(fan_in) after
  truncation; biases 0 for training), 1.7x the std of PyTorch's default; with that
  initialiser (seed 0) the paper recipe gave
  1.91% at 95% and 2.89% at 98% -- no better, so the initialiser is not the gap.
  Other differences in that code, read on 2026-12-01 and not reproduced here: the
  connection sensitivity is computed on one variance-scaling draw (``weights_bp``) and the
  mask trains a *second, independent* draw (``weights_ap``, biases zero) -- the
  ``pai-reinit`` ablation of prunelab; the biases are scored and kept in the same global
  top-k as the weights; 10% of the training images are held out as a validation split
  (training sees 54,000); MNIST is standardised with the training set's mean and std, as
  here.  Training the mask on a second draw (``pai-reinit``, paper recipe, seed 0, 2026-12-01)
  gave 1.96% at 95% against 1.87% on the scored draw: not the gap.  The other differences are
  not measured, except for one more option of that code: its
  ``translate_px`` augmentation (off by default; imgaug shifts of up to 4 pixels, each image
  shifted with probability 1/2) gave 1.83% at 95% (paper recipe, seed 0, 2026-12-01) against
  1.87% without it -- not the gap either.  Nor is the score's batch the gap: with the
  default recipe (seed 0, 2026-12-01) SNIP scored on 1 / 10 / 100 training batches gave 2.16 /
  2.58 / 2.22% error at 95% and 3.44 / 3.08 / 2.96% at 98% -- no steady gain at 95%, and at 98%
  a gain within the seed spread (std 0.22).

The error reported is the final test error.  The reference code reports the best test
accuracy over its last checkpoints (``test.py``: ``1 - max(acc)`` over the checkpoints
``tf.train.Saver()`` keeps, the last 5, saved every 1,000 iterations), a choice made on
the test set that can only lower the number.  ``--curve`` measures that effect: it
evaluates the test set after every epoch.  Measured with the paper recipe and seed 0
(2026-12-01; the same per-epoch hook, ``after_epoch``, run from a one-off script): the
best of the last 5 epochs is 1.82% at 95% and 2.77% at 98% (final 1.85% and 2.81%), and
the best epoch of the whole run is 1.65% (epoch 53) and 2.65% (epoch 60) -- both in the
second learning-rate phase (lr 0.01); the third phase (lr 0.001) ends 0.2 points higher.
So even the test-selected best epoch misses 2.4% at 98%: checkpoint selection is not the
whole gap either.  (A validation-selected epoch, the honest form of early stopping, can
only do worse than the test-selected one.)

    python benchmarks/snip_lenet300.py --recipe paper --curve --methods SNIP   # writes snip_lenet300_variant.json

Note: magnitude at init with a *global* threshold removes the layer with the smallest
initial weights (fc1, Kaiming-uniform bound 1/sqrt(784)) first -- at 98% it cuts fc1
entirely (layer collapse, Tanaka et al. 2020); the per-layer kept fractions show it.

    python benchmarks/snip_lenet300.py            # full run, writes benchmarks/results/snip_lenet300.{json,png}
    python benchmarks/snip_lenet300.py --quick    # 1 seed, 1 epoch: checks the script works
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

from prunelab.bench.datasets import load_dataset, make_loaders
from prunelab.bench.models import build_model
from prunelab.bench.plots import plot_axes
from prunelab.bench.records import (
    benchmark_args, benchmark_environment, publish, resolve_data_dir, run_guarded, target,
)
from prunelab.bench.recipes import LENET300_DENSE
from prunelab.bench.training import TrainConfig, evaluate, seed_everything
from prunelab.criteria import ScoreData
from prunelab.errors import PrunelabError
from prunelab.methods import PruneSpec
from prunelab.methods.pai import run_pai, run_snip

RECIPES = {
    "lenet300": dataclasses.replace(LENET300_DENSE, epochs=30, progress=False),
    # Lee et al. 2019 section 5 / snip-public: 25k iterations of batch 100 per lr phase = 41.7 epochs of MNIST's 60k.
    "paper": TrainConfig(epochs=125, batch_size=100, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
                         lr_schedule="step", step_epochs=42, gamma=0.1, seed=0, progress=False),
}
SPARSITIES = (0.95, 0.98)
SEEDS = (0, 1, 2)
METHODS = {  # label -> (runner, criterion for run_pai)
    "SNIP": (run_snip, "snip"),
    "random": (run_pai, "random"),
    "magnitude at init": (run_pai, "magnitude"),
}
PAPER = {0.95: 1.6, 0.98: 2.4}  # Lee et al. 2019 Table 1, SNIP test error %
LAYERS = ("fc1", "fc2", "fc3")


def run_one(splits, label: str, sparsity: float, seed: int, config, curve: bool = False) -> dict:
    """One prune-at-init + train run; ``curve``: also the test error after every epoch (test-selected best)."""
    runner, criterion = METHODS[label]
    seed_everything(seed)
    model = build_model("lenet300", splits.input_shape, splits.num_classes)
    train_loader, test_loader = make_loaders(splits, config.batch_size, seed)
    score_data = ScoreData(train_loader, max_batches=1) if criterion == "snip" else None
    spec = PruneSpec(sparsity=sparsity, criterion=criterion, allocation="global")
    errors: list[float] = []  # test error % after epoch 1, 2, ...
    after_epoch = (lambda _epoch: errors.append(evaluate(model, test_loader)["error_pct"])) if curve else None
    started = time.perf_counter()
    result = runner(model, train_loader, test_loader, spec, dataclasses.replace(config, seed=seed), score_data=score_data,
                    after_epoch=after_epoch)
    layers = {l.name.split(".")[0]: 100.0 * l.kept / l.total for l in result.masks.stats().layers}
    run = {"error_pct": result.rows[-1]["error_pct"], "sparsity": result.masks.stats().sparsity,
           "wall_time_s": time.perf_counter() - started, **{f"kept_{k}_pct": layers[k] for k in LAYERS}}
    if curve:
        run.update(test_error_curve=errors, best_epoch_error_pct=min(errors), best_epoch=1 + errors.index(min(errors)),
                   best_of_last5_error_pct=min(errors[-5:]))
    return run


def plot(rows: list[dict], path: Path) -> None:
    with plot_axes(path, figsize=(6, 4)) as ax:
        for label in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == label]
            ax.errorbar([r["sparsity_pct"] for r in mine], [r["error_pct"] for r in mine],
                        yerr=[r["error_std_pct"] for r in mine], marker="o", capsize=3, label=label)
        ax.scatter([100 * s for s in PAPER], list(PAPER.values()), marker="*", s=120, color="black", label="SNIP (paper)",
                   zorder=5)
        ax.set_yscale("log")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("test error (%), mean ± std over seeds")
        ax.set_title("LeNet-300-100 / MNIST, pruned at init")
        ax.legend()


def main(argv=None) -> int:
    parser = benchmark_args(__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="lenet300",
                        help="training recipe of every run (default lenet300; paper: Lee et al.'s schedule, ~6x longer)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs of every run (default: the recipe's)")
    parser.add_argument("--curve", action="store_true",
                        help="also evaluate the test set after every epoch and report the best epoch's error "
                             "(test-selected, as Lee et al.'s test.py; one extra test pass per epoch)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated methods to run (default all: {', '.join(METHODS)})")
    args = parser.parse_args(argv)
    quick = args.quick
    started = time.perf_counter()
    splits = load_dataset("mnist", resolve_data_dir(args.data_dir))
    recipe = RECIPES[args.recipe]
    config = dataclasses.replace(recipe, epochs=1 if quick else (args.epochs or recipe.epochs))
    seeds = SEEDS[:1] if quick else SEEDS
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or "SNIP" not in methods:
        raise PrunelabError(f"--methods {args.methods!r}: {'unknown ' + ', '.join(unknown) if unknown else 'SNIP missing'}; "
                            f"choose from {', '.join(METHODS)} (SNIP is required: the targets are SNIP's)")

    rows = []
    for sparsity in SPARSITIES:
        for label in methods:
            runs = [run_one(splits, label, sparsity, seed, config, args.curve) for seed in seeds]
            errors = [r["error_pct"] for r in runs]
            row = {"method": label, "sparsity_pct": 100 * statistics.fmean(r["sparsity"] for r in runs),
                   "error_pct": statistics.fmean(errors), "error_std_pct": statistics.stdev(errors) if len(errors) > 1 else 0.0,
                   "error_min_pct": min(errors), "error_max_pct": max(errors),
                   **{f"kept_{k}_pct": statistics.fmean(r[f"kept_{k}_pct"] for r in runs) for k in LAYERS},
                   "wall_time_s": sum(r["wall_time_s"] for r in runs), "seeds": len(runs)}
            if args.curve:
                for key in ("best_epoch_error_pct", "best_of_last5_error_pct"):
                    row[key] = statistics.fmean(r[key] for r in runs)
                row["best_epochs"] = [r["best_epoch"] for r in runs]
                row["test_error_curves"] = [r["test_error_curve"] for r in runs]
            rows.append(row)
            print(f"{label} @ {100 * sparsity:.0f}%: error {row['error_pct']:.2f} ± {row['error_std_pct']:.2f}% "
                  f"({', '.join(f'{e:.2f}' for e in errors)}) in {row['wall_time_s']:.0f} s")

    total = time.perf_counter() - started
    snip = {round(r["sparsity_pct"] / 100, 2): r for r in rows if r["method"] == "SNIP"}
    budget = 1500 if args.recipe == "lenet300" else 6000
    targets = [
        target("SNIP mean test error at 95% sparsity (%)", round(snip[0.95]["error_pct"], 3), "<= 1.7",
               snip[0.95]["error_pct"] <= 1.7),
        target("SNIP mean test error at 98% sparsity (%)", round(snip[0.98]["error_pct"], 3), "<= 2.4",
               snip[0.98]["error_pct"] <= 2.4),
        target("total wall time (s)", round(total, 1), f"<= {budget}", total <= budget),
    ]
    notes = ""
    if not all(t["met"] for t in targets[:2]):
        iterations = config.epochs * -(-len(splits.train) // config.batch_size)
        notes = (f"Each run here trains {config.epochs} epochs ({iterations:,} iterations of batch {config.batch_size}, "
                 f"weight decay {config.weight_decay:g}, {config.lr_schedule} decay) and reports the final test error. "
                 "Lee et al. decay lr 0.1 by 0.1 every 25k iterations of batch 100 with weight decay 5e-4 and report "
                 "the best test accuracy over their last checkpoints. Their schedule is --recipe paper (75k iterations); "
                 "the script's docstring records what it gave (2026-12-01): part of the gap, not all of it.")
    columns = [("method", "method"), ("sparsity_pct", "sparsity %"), ("error_pct", "test error % (mean)"),
               ("error_std_pct", "std"), ("error_min_pct", "min"), ("error_max_pct", "max"),
               ("kept_fc1_pct", "fc1 kept %"), ("kept_fc2_pct", "fc2 kept %"), ("kept_fc3_pct", "fc3 kept %"),
               ("wall_time_s", "wall s")]
    if args.curve:
        columns[3:3] = [("best_epoch_error_pct", "best epoch % (test-selected)"),
                        ("best_of_last5_error_pct", "best of last 5 epochs %")]
    reference_rows = [{"method": "SNIP (Lee et al. 2019, Table 1)", "sparsity_pct": 100 * s, "error_pct": e}
                      for s, e in PAPER.items()]
    record = {
        "config": {"recipe": args.recipe, "train": dataclasses.asdict(config), "sparsities": list(SPARSITIES), "allocation": "global",
                   "snip_batches": 1, "methods": methods, "curve": args.curve, "quick": quick},
        "seeds": list(seeds),
        "environment": benchmark_environment(),
        "columns": columns,
        "rows": rows,
        "reference_rows": reference_rows,
        "targets": targets,
        "notes": notes,
        "total_wall_time_s": total,
    }
    default_grid = args.recipe == "lenet300" and methods == list(METHODS) and not args.curve and args.epochs is None
    name = "snip_lenet300" if default_grid else "snip_lenet300_variant"  # a variant never replaces the README's record
    publish(name, record, args.out, plot=lambda png: plot(rows, png))
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
