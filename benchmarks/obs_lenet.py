"""OBS-family one-shot pruning of LeNet-300-100 on MNIST, without retraining.

Hassibi & Stork 1992 (OBS) and Dong et al. 2017 (L-OBS) claim that second-order pruning
keeps far more accuracy than magnitude or OBD (LeCun et al. 1990) when no retraining
follows.  This script trains LeNet-300-100 once, then prunes copies of it **once, with no
retraining**, to 50/60/70/80/90% sparsity (every layer at the same sparsity) with:

* ``magnitude``  -- smallest ``|w|`` per layer (prunelab.oneshot, ``method='magnitude'``);
* ``OBD``        -- ``prunelab.Sparsifier(criterion='obd', allocation='uniform')`` scored on
  the calibration batches (exact Hessian diagonal for fc3, empirical Fisher for fc1/fc2);
* ``L-OBS``      -- ``method='lobs'``: per-layer OBS saliency with ``H = 2 X X^T / n``, then
  the exact compensating update;
* ``OBS``        -- ``method='obs'``: greedy row-wise OBS with inverse-Hessian downdates.
  Full run: all three layers.  ``--quick``: fc2/fc3 only, fc1 (784 inputs, the costly one:
  ``O(rows * k * 784^2)``) is pruned by L-OBS first (noted in the row's ``fc1_method``);
* ``SparseGPT`` and ``Wanda`` -- for reference;
* ``L-OBS + dense targets`` and ``SparseGPT + dense targets`` -- the engine's
  ``dense_targets``: each layer reconstructs the dense network's output from the pruned
  network's inputs (Li et al. 2025, GPTAQ), so fc2 and fc3 make up for fc1's error.  On this
  3-layer MLP it pays only at 90% (first run, 2026-12-01: SparseGPT 3.79 -> 3.17%, L-OBS
  3.35 -> 3.20%) and costs up to 0.17 points at 50-80%; on the 6- and 4-block transformers
  (minilm_oneshot, llm_oneshot_tinygpt) it is the best method at every setting.

Calibration: 1024 training images (512 with ``--quick``), shared by all data-aware methods.
Target (the claim): at every sparsity from 50% to 90%, the OBS-family test error (L-OBS and
OBS) is <= that of magnitude and of OBD, judged strictly.  At 50% and 60% every method is
still within a few test images of the dense network (the binomial standard error of a 1.5%
error on 10,000 images is 0.12 points), so a miss there by 1-2 images says the methods tie,
not that magnitude wins; an earlier version allowed a 0.02-point tie, chosen after seeing
the errors, and was dropped for that reason.  The record's paired table (``extra_tables``) says how big such
a miss is, as information and not as a target (it was added after the strict result was
known): per sparsity and pair, the test images only the OBS-family method gets wrong
(``only_family_wrong``), those only the baseline gets wrong, and the exact two-sided McNemar
p-value of that split (``p = min(1, 2 P[Bin(n, 1/2) <= min])``, ``n`` the discordant images).

    python benchmarks/obs_lenet.py            # full run, writes benchmarks/results/obs_lenet.json
    python benchmarks/obs_lenet.py --quick    # 2 dense epochs, 50/70/90% only, 512 images (< 2 minutes)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from fractions import Fraction

import torch
import torch.nn.functional as F

from prunelab import ScoreData, Sparsifier
from prunelab.bench.datasets import load_dataset, make_loaders
from prunelab.bench.records import (
    benchmark_args, benchmark_environment, resolve_data_dir, rows_table, run_guarded, target, targets_table, write_record,
)
from prunelab.bench.recipes import lenet300_dense_config, train_dense
from prunelab.bench.training import evaluate
from prunelab.oneshot import OneShotConfig, prune_oneshot

SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9)
QUICK_SPARSITIES = (0.5, 0.7, 0.9)
LAYERS = ("fc1", "fc2", "fc3")


def _correct(model, loader) -> torch.Tensor:
    """Per test image, whether ``model``'s top-1 prediction is right (bool, in loader order)."""
    with torch.no_grad():
        return torch.cat([model(x).argmax(dim=1) == y for x, y in loader])


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value of ``only_a`` vs ``only_b`` discordant pairs (binomial, p = 1/2)."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, float(2 * Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2 ** n)))  # exact: n may pass 1023


def _calibration(splits, count: int, seed: int, batch: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` training images (a seeded random subset) as ``(x, y)`` batches."""
    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(seed))[:count]
    xs, ys = zip(*(splits.train[int(i)] for i in order), strict=True)
    x, y = torch.stack(xs), torch.as_tensor(ys)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, count, batch)]


def _oneshot(dense, images, method: str, sparsity: float, exclude: tuple[str, ...] = (), dense_targets: bool = False):
    model = copy.deepcopy(dense)
    config = OneShotConfig(method=method, sparsity=sparsity, exclude=exclude, dense_targets=dense_targets)
    report = prune_oneshot(model, images, config, progress=False)
    return model, report.wall_time_s


def _obs(dense, images, sparsity: float, quick: bool):
    """OBS on every layer; with ``quick`` fc1 is pruned by L-OBS first, then OBS on fc2/fc3
    (the second call recalibrates on the pruned fc1, as the engine does inside a model)."""
    if not quick:
        return _oneshot(dense, images, "obs", sparsity)
    model, first = _oneshot(dense, images, "lobs", sparsity, exclude=("fc2", "fc3"))
    report = prune_oneshot(model, images, OneShotConfig(method="obs", sparsity=sparsity, exclude=("fc1",)), progress=False)
    return model, first + report.wall_time_s


def _obd(dense, batches, sparsity: float):
    model = copy.deepcopy(dense)
    started = time.perf_counter()
    data = ScoreData(batches=batches, loss_fn=F.cross_entropy)
    Sparsifier(model, criterion="obd", allocation="uniform", data=data).update(sparsity)
    return model, time.perf_counter() - started


def main(argv=None) -> int:
    parser = benchmark_args(__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick, seed = args.quick, args.seed
    sparsities = QUICK_SPARSITIES if quick else SPARSITIES
    started = time.perf_counter()
    splits = load_dataset("mnist", resolve_data_dir(args.data_dir))
    dense_cfg = dataclasses.replace(lenet300_dense_config(quick), seed=seed, progress=False)
    _, test_loader = make_loaders(splits, dense_cfg.batch_size, seed)
    dense, dense_time = train_dense(splits, "lenet300", dense_cfg)
    dense.eval()
    dense_error = evaluate(dense, test_loader)["error_pct"]
    print(f"dense: test error {dense_error:.2f}% after {dense_time:.0f} s")

    batches = _calibration(splits, 512 if quick else 1024, seed)
    images = [x for x, _ in batches]
    methods = {
        "magnitude": lambda s: _oneshot(dense, images, "magnitude", s),
        "OBD": lambda s: _obd(dense, batches, s),
        "L-OBS": lambda s: _oneshot(dense, images, "lobs", s),
        "OBS": lambda s: _obs(dense, images, s, quick),
        "SparseGPT": lambda s: _oneshot(dense, images, "sparsegpt", s),
        "Wanda": lambda s: _oneshot(dense, images, "wanda", s),
        "L-OBS + dense targets": lambda s: _oneshot(dense, images, "lobs", s, dense_targets=True),
        "SparseGPT + dense targets": lambda s: _oneshot(dense, images, "sparsegpt", s, dense_targets=True),
    }
    rows, errors, correct = [], {}, {}
    for name, prune in methods.items():
        row = {"method": name, "fc1_method": "lobs" if name == "OBS" and quick else "", "prune_time_s": 0.0}
        for sparsity in sparsities:
            model, seconds = prune(sparsity)
            kept = {layer: float((getattr(model, layer).weight != 0).float().mean()) for layer in LAYERS}
            achieved = 1.0 - sum(kept[l] * getattr(model, l).weight.numel() for l in LAYERS) / \
                sum(getattr(model, l).weight.numel() for l in LAYERS)
            error = evaluate(model, test_loader)["error_pct"]
            errors[name, sparsity] = error
            correct[name, sparsity] = _correct(model.eval(), test_loader)
            pct = int(round(100 * sparsity))
            row[f"error_{pct}_pct"] = error
            row[f"sparsity_{pct}_pct"] = 100 * achieved
            row["prune_time_s"] += seconds
            print(f"{name:>9} {pct}%: test error {error:.2f}% (achieved sparsity {100 * achieved:.2f}%, {seconds:.1f} s)")
        rows.append(row)

    targets = []
    for sparsity in sparsities:
        pct = int(round(100 * sparsity))
        bar = min(errors["magnitude", sparsity], errors["OBD", sparsity])
        for family in ("L-OBS", "OBS"):
            value = errors[family, sparsity]
            targets.append(target(f"{family} test error at {pct}% (%)", round(value, 2),
                                  f"<= magnitude and OBD ({bar:.2f})", value <= bar + 1e-9))
    paired = []  # information, not a target: how many test images separate the OBS family from each baseline
    for sparsity in sparsities:
        for family in ("L-OBS", "OBS"):
            for baseline in ("magnitude", "OBD"):
                mine, theirs = correct[family, sparsity], correct[baseline, sparsity]
                only_family, only_baseline = int((~mine & theirs).sum()), int((mine & ~theirs).sum())
                paired.append({"sparsity_pct": int(round(100 * sparsity)), "family": family, "baseline": baseline,
                               "only_family_wrong": only_family, "only_baseline_wrong": only_baseline,
                               "mcnemar_p": float(f"{mcnemar_p(only_family, only_baseline):.3g}")})
    paired_columns = [("sparsity_pct", "sparsity %"), ("family", "method"), ("baseline", "vs"),
                      ("only_family_wrong", "images only it gets wrong"),
                      ("only_baseline_wrong", "images only the baseline gets wrong"), ("mcnemar_p", "McNemar p")]
    columns = [("method", "method")] + [(f"error_{int(round(100 * s))}_pct", f"err % @{int(round(100 * s))}%")
                                        for s in sparsities] + [("prune_time_s", "prune s (all levels)")]
    record = {
        "config": {"dense": dataclasses.asdict(dense_cfg), "sparsities": list(sparsities),
                   "calibration_images": sum(len(x) for x in images), "allocation": "uniform (every layer at the target)",
                   "obd": {"criterion": "obd", "hessian": "auto", "allocation": "uniform"},
                   "oneshot": {"dampening": OneShotConfig().dampening, "block_size": OneShotConfig().block_size},
                   "quick": quick},
        "seeds": [seed],
        "environment": benchmark_environment(),
        "dense_error_pct": dense_error,
        "dense_time_s": dense_time,
        "rows": rows,
        "columns": columns,
        "targets": targets,
        "extra_tables": [{"title": "Paired comparison on the 10,000 test images (information, not a target): "
                                   "images only the OBS-family method gets wrong, only the baseline gets wrong, "
                                   "and the exact McNemar p-value",
                          "rows": paired, "columns": paired_columns}],
        "total_wall_time_s": time.perf_counter() - started,
    }
    path = write_record("obs_lenet", record, args.out)
    print()
    print(f"dense test error: {dense_error:.2f}%")
    print(rows_table(rows, columns))
    print()
    print(targets_table(targets))
    print()
    print(rows_table(paired, paired_columns))
    print(f"\nrecord: {path} ({record['total_wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
