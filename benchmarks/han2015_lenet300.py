"""Han et al. 2015, Table 1: LeNet-300-100 on MNIST, pruned by iterative magnitude pruning.

Han, Pool, Tran, Dally, "Learning both Weights and Connections for Efficient Neural
Networks", NeurIPS 2015: dense 1.64% error; pruned 1.59% with 8% of weights kept (12x),
per-layer kept 8% / 9% / 26%.  Target here: >= 92% sparsity at <= 1.60% test error on a
2-core CPU in under 10 minutes.  Also runs 95% and 98% and lists them next to Lee et al.
2019 (SNIP) Table 1's LeNet-300-100 rows: LWC 91.7%/1.6, SWS 95.6%/1.9, DNS 98.2%/2.0,
L-OBS 98.5%/2.0.

The dense network is trained once; each sparsity level prunes a copy of it with the same
schedule: R rounds of global magnitude pruning, each removing the same fraction of the
remaining weights, each followed by retraining with a restarted cosine learning rate.

    python benchmarks/han2015_lenet300.py            # full run, writes benchmarks/results/han2015_lenet300.json
    python benchmarks/han2015_lenet300.py --quick    # a 1-minute smoke run
"""

from __future__ import annotations

import dataclasses
import sys
import time

from prunelab.bench.datasets import load_dataset, make_loaders
from prunelab.bench.records import (
    benchmark_args, benchmark_environment, publish, resolve_data_dir, run_guarded, target,
)
from prunelab.bench.recipes import (
    iterative_prune, lenet300_dense_config, lenet300_finetune_config, lenet300_prune_spec, train_dense,
)
from prunelab.bench.training import evaluate
from prunelab.measure.counting import measure_model

HAN_KEPT = {"fc1.weight": 0.08, "fc2.weight": 0.09, "fc3.weight": 0.26}
LITERATURE = [  # Lee et al. 2019 Table 1 (LeNet-300-100): sparsity %, error %
    {"method": "LWC (Han et al. 2015)", "sparsity_pct": 91.7, "error_pct": 1.6},
    {"method": "SWS (Ullrich et al. 2017)", "sparsity_pct": 95.6, "error_pct": 1.9},
    {"method": "DNS (Guo et al. 2016)", "sparsity_pct": 98.2, "error_pct": 2.0},
    {"method": "L-OBS (Dong et al. 2017)", "sparsity_pct": 98.5, "error_pct": 2.0},
]


def main(argv=None) -> int:
    parser = benchmark_args(__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick, seed = args.quick, args.seed
    started = time.perf_counter()
    splits = load_dataset("mnist", resolve_data_dir(args.data_dir))
    dense_cfg = dataclasses.replace(lenet300_dense_config(quick), seed=seed)
    tune_cfg = dataclasses.replace(lenet300_finetune_config(quick), seed=seed)
    spec_base = lenet300_prune_spec(0.92, quick)
    _, test_loader = make_loaders(splits, dense_cfg.batch_size, seed)
    example = splits.test[0][0].unsqueeze(0)

    model, dense_time = train_dense(splits, "lenet300", dense_cfg)
    dense = evaluate(model, test_loader)
    dense_cost = measure_model(model, example)
    rows = [{"model": "dense", "target_sparsity_pct": 0.0, "sparsity_pct": 0.0, "error_pct": dense["error_pct"],
             "compression_x": 1.0, "kept_fc1_pct": 100.0, "kept_fc2_pct": 100.0, "kept_fc3_pct": 100.0,
             "wall_time_s": dense_time}]
    print(f"dense: error {dense['error_pct']:.2f}% after {dense_time:.0f} s")

    for sparsity in (0.92,) if quick else (0.92, 0.95, 0.98):
        run = iterative_prune(model, splits, dataclasses.replace(spec_base, sparsity=sparsity), tune_cfg)
        cost = measure_model(run.model, example, run.result.masks)
        layers = {l.name: l for l in run.result.masks.stats().layers}
        row = {"model": f"IMP {int(round(100 * sparsity))}%", "target_sparsity_pct": 100 * sparsity,
               "sparsity_pct": 100 * run.result.masks.stats().sparsity, "error_pct": run.error_pct,
               "compression_x": cost.params / cost.nonzeros,
               **{f"kept_{n.split('.')[0]}_pct": 100 * layers[n].kept / layers[n].total for n in HAN_KEPT},
               "wall_time_s": dense_time + run.wall_time_s}
        rows.append(row)
        print(f"{row['model']}: sparsity {row['sparsity_pct']:.2f}% error {row['error_pct']:.2f}% "
              f"({run.wall_time_s:.0f} s pruning + retraining)")

    best92 = rows[1]
    targets = [
        target("sparsity at the 92% run (%)", round(best92["sparsity_pct"], 2), ">= 92", best92["sparsity_pct"] >= 92.0 - 1e-9),
        target("test error at >= 92% sparsity (%)", round(best92["error_pct"], 2), "<= 1.60", best92["error_pct"] <= 1.60),
        target("wall time dense + 92% run (s)", round(best92["wall_time_s"], 1), "< 600", best92["wall_time_s"] < 600),
    ]
    columns = [("model", "model"), ("sparsity_pct", "sparsity %"), ("error_pct", "test error %"),
               ("compression_x", "compression x"), ("kept_fc1_pct", "fc1 kept %"), ("kept_fc2_pct", "fc2 kept %"),
               ("kept_fc3_pct", "fc3 kept %"), ("wall_time_s", "wall s")]
    reference_rows = [{"model": "Han et al. 2015 (paper)", "sparsity_pct": 92.0, "error_pct": 1.59, "compression_x": 12.0,
                       "kept_fc1_pct": 8.0, "kept_fc2_pct": 9.0, "kept_fc3_pct": 26.0}]
    reference_rows += [{"model": f"{r['method']} (Lee et al. 2019, Table 1)", "sparsity_pct": r["sparsity_pct"],
                        "error_pct": r["error_pct"], "compression_x": 100 / (100 - r["sparsity_pct"])} for r in LITERATURE]
    record = {
        "config": {"dense": dataclasses.asdict(dense_cfg), "finetune": dataclasses.asdict(tune_cfg),
                   "prune": {"criterion": spec_base.criterion, "allocation": spec_base.allocation,
                             "rounds": spec_base.rounds, "finetune_epochs_per_round": spec_base.finetune_epochs},
                   "quick": quick},
        "seeds": [seed],
        "environment": benchmark_environment(),
        "rows": rows,
        "reference_rows": reference_rows,
        "columns": columns,
        "dense_cost": dense_cost.to_dict(),
        "targets": targets,
        "total_wall_time_s": time.perf_counter() - started,
    }
    publish("han2015_lenet300", record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
