"""Sparse activations that pay: k-winners-take-all vs ReLU on an MNIST MLP, and sparse-input Linears.

Ahmad & Scheinkman 2019, "How Can We Be So Dense? The Benefits of Using Highly Sparse
Representations": networks whose hidden layers keep only the k most active units per
input (k-WTA) train to the accuracy of dense ReLU networks on MNIST.  Such activations
are a sparsity a CPU can use without sparse weights: the layer after them only needs the
weight rows of the active inputs (:class:`prunelab.activations.SparseInputLinear`).

Two MLPs 784-2048-2048-10 train with the same recipe (SGD, momentum 0.9, lr 0.05, cosine,
``--epochs`` 8, batch 128, seed 0): ReLU, and k-WTA with ``k`` = 102 of 2048 (5%) after each
hidden Linear (:class:`prunelab.activations.TopKActivation`).  Reported: test error, the
measured fraction of zero activations per hidden layer on the test set
(:func:`prunelab.activations.activation_sparsity`), and latency at batch 1 and 8 of each
model as trained vs the same model with sparse-input Linears after its activations
(:func:`prunelab.activations.sparse_input_model`), timed side by side; outputs must agree.

Measured on 2026-12-01 (the record): the sparse-input path is not free -- it first finds
the batch's active columns, then gathers them -- so it pays only where few inputs are
active in the whole batch.  ReLU's ~50-70% zeros give x1.5 at batch 1 but x0.6 (slower) at
batch 8, where the union of active inputs is nearly dense; k-WTA's 95% keeps it ahead.

Targets: k-WTA test error at most 0.5 points above ReLU's; the k-WTA model with
sparse-input Linears at least 2x faster than dense at batch 1; outputs equal (max abs
difference <= 1e-4).

    python benchmarks/activation_sparsity.py           # writes benchmarks/results/activation_sparsity.json
    python benchmarks/activation_sparsity.py --quick   # 1 epoch
"""

from __future__ import annotations

import dataclasses
import sys
import time

import torch
from torch import nn

from prunelab.activations import TopKActivation, activation_sparsity, sparse_input_model
from prunelab.bench.datasets import load_dataset, make_loaders
from prunelab.bench.records import (
    benchmark_args, benchmark_environment, publish, resolve_data_dir, run_guarded, target,
)
from prunelab.bench.training import TrainConfig, evaluate, seed_everything, train
from prunelab.measure.latency import model_latency_ms

WIDTH, K = 2048, 102
TRAIN = TrainConfig(epochs=8, batch_size=128, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4,
                    lr_schedule="cosine", seed=0, progress=False)
COLUMNS = [("activation", "activation"), ("error_pct", "test error %"), ("zeros_1_pct", "zeros layer 1 %"),
           ("zeros_2_pct", "zeros layer 2 %"), ("b1_speedup_x", "sparse-input x (batch 1)"),
           ("b8_speedup_x", "sparse-input x (batch 8)"), ("max_abs_error", "max abs diff")]


def mlp(activation) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, WIDTH), activation(), nn.Linear(WIDTH, WIDTH), activation(),
                         nn.Linear(WIDTH, 10))


def main(argv=None) -> int:
    parser = benchmark_args(__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=TRAIN.epochs, help=f"training epochs (default {TRAIN.epochs})")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    splits = load_dataset("mnist", resolve_data_dir(args.data_dir))
    config = dataclasses.replace(TRAIN, epochs=1 if args.quick else args.epochs)
    rows = []
    for label, activation in (("ReLU", nn.ReLU), (f"k-WTA (k={K} of {WIDTH})", lambda: TopKActivation(K))):
        seed_everything(0)
        model = mlp(activation)
        train_loader, test_loader = make_loaders(splits, config.batch_size, 0)
        tick = time.perf_counter()
        train(model, train_loader, config, description=label)
        model.eval()
        error = evaluate(model, test_loader)["error_pct"]
        zeros = list(activation_sparsity(model, test_loader).values())
        fast = sparse_input_model(model)
        row = {"activation": label, "error_pct": error, "zeros_1_pct": 100 * zeros[0], "zeros_2_pct": 100 * zeros[1],
               "train_s": time.perf_counter() - tick}
        images = torch.stack([splits.test[i][0] for i in range(64)])  # (64, 1, 28, 28)
        with torch.no_grad():
            row["max_abs_error"] = float((fast(images) - model(images)).abs().max())
        for batch in (1, 8):
            ms = model_latency_ms({"dense": model, "sparse": fast}, images[:batch], 25)
            row.update({f"b{batch}_dense_ms": ms["dense"], f"b{batch}_sparse_ms": ms["sparse"],
                        f"b{batch}_speedup_x": ms["dense"] / ms["sparse"]})
        rows.append(row)
        print(f"{label}: test error {error:.2f}%, zeros {100 * zeros[0]:.1f}% / {100 * zeros[1]:.1f}%, sparse-input "
              f"x{row['b1_speedup_x']:.2f} (batch 1), x{row['b8_speedup_x']:.2f} (batch 8)", flush=True)

    relu, kwta = rows
    gap = kwta["error_pct"] - relu["error_pct"]
    worst = max(r["max_abs_error"] for r in rows)
    targets = [
        target("k-WTA - ReLU test error (points)", round(gap, 3), "<= 0.5", gap <= 0.5),
        target("k-WTA sparse-input speed-up at batch 1 (x)", round(kwta["b1_speedup_x"], 3), ">= 2",
               kwta["b1_speedup_x"] >= 2.0),
        target("sparse-input vs dense max abs difference", worst, "<= 1e-4", worst <= 1e-4),
    ]
    record = {
        "config": {"train": dataclasses.asdict(config), "width": WIDTH, "k": K, "threads": torch.get_num_threads(),
                   "quick": args.quick},
        "seeds": [0],
        "environment": benchmark_environment(),
        "columns": COLUMNS,
        "rows": rows,
        "targets": targets,
        "total_wall_time_s": time.perf_counter() - started,
    }
    publish("activation_sparsity", record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
