"""Layer pruning of a real sentence encoder: drop whole layers of all-MiniLM-L6-v2 by block influence.

Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You
Expect": score each transformer layer by its block influence ``BI = 1 - E_t cos(x_in,
x_out)`` on calibration tokens and remove the layers with the lowest BI; their Table 3
shows BI ordering ahead of other layer-removal orders at equal depth.  Removing layers
needs no sparse kernel: the model is really shallower.

Here: BI of each of the 6 encoder layers on ``--calib-samples`` (512) Tiny Shakespeare
training lines (:func:`prunelab.layers.block_influence`, padding left out); then 1, 2 and
3 layers removed (:func:`prunelab.layers.drop_blocks`, ``config.num_hidden_layers``
updated) in three orders: lowest BI, the last layers, and random (3 seeds, mean).  Measures,
as in ``minilm_oneshot.py`` on 1000 held-out lines: mean cosine to the dense sentence
embeddings and nearest-neighbour agreement; and the encoder's latency on one batch of
64 lines vs dense (side by side, interleaved medians).

Targets: at every depth, the BI order keeps a mean cosine at least that of random removal
(mean of 3 seeds) and of removing the last layers; latency with ``k`` of 6 layers removed
is within 25% of ``(6 - k) / 6`` of dense (at batch 64 the encoder layers dominate).

    python benchmarks/layer_dropping.py           # writes benchmarks/results/layer_dropping.{json,png}
    python benchmarks/layer_dropping.py --quick   # 200 lines, 64 calibration lines
"""

from __future__ import annotations

import copy
import random
import statistics
import sys
import time

import torch

from prunelab.bench.minilm import (
    BatchEncoder, add_text_args, embed_sentences, minilm_and_text, nearest_neighbours, tokenized_batches,
)
from prunelab.bench.plots import plot_axes
from prunelab.bench.records import (
    benchmark_args, benchmark_environment, publish, run_guarded, target,
)
from prunelab.layers import block_influence, drop_blocks, lowest_influence
from prunelab.measure.latency import model_latency_ms

DEPTHS = (1, 2, 3)
RANDOM_SEEDS = (0, 1, 2)
COLUMNS = [("dropped", "layers dropped"), ("order", "order"), ("layers", "which"), ("mean_cosine", "mean cosine"),
           ("nn_agreement_pct", "NN agreement %"), ("latency_ratio", "latency x"), ("ideal_ratio", "(6-k)/6")]


def plot(rows: list[dict], path) -> None:
    with plot_axes(path, figsize=(6, 4)) as ax:
        for order in ("lowest BI", "last layers", "random"):
            mine = [r for r in rows if r["order"] == order]
            ax.plot([0] + [r["dropped"] for r in mine], [1.0] + [r["mean_cosine"] for r in mine], marker="o", label=order)
        ax.set_xticks([0, *DEPTHS])
        ax.set_xlabel("encoder layers removed (of 6)")
        ax.set_ylabel("mean cosine to dense embeddings")
        ax.set_title("all-MiniLM-L6-v2: layer removal, no retraining")
        ax.legend()


def main(argv=None) -> int:
    parser = benchmark_args(__doc__.splitlines()[0])
    add_text_args(parser)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    dense, tokenizer, calib_text, lines = minilm_and_text(args)
    scores = block_influence(dense, tokenized_batches(tokenizer, calib_text, batch_size=16))
    names = list(scores)
    print("block influence: " + ", ".join(f"{n.rsplit('.', 1)[-1]} {s:.4f}" for n, s in scores.items()), flush=True)
    reference = embed_sentences(dense, tokenizer, lines)  # (N, 384)
    reference_nn = nearest_neighbours(reference)
    timing_batch = dict(tokenizer(lines[:64], padding=True, truncation=True, max_length=256, return_tensors="pt"))

    def evaluate(dropped: list[str]) -> dict:
        model = drop_blocks(copy.deepcopy(dense), dropped)
        emb = embed_sentences(model, tokenizer, lines)
        return {"mean_cosine": float((emb * reference).sum(1).mean()),
                "nn_agreement_pct": 100 * float((nearest_neighbours(emb) == reference_nn).float().mean()),
                "model": model}

    rows = []
    for k in DEPTHS:
        orders = {"lowest BI": [lowest_influence(scores, k)], "last layers": [names[-k:]],
                  "random": [sorted(random.Random(seed).sample(names, k), key=names.index) for seed in RANDOM_SEEDS]}
        for order, choices in orders.items():
            results = [evaluate(choice) for choice in choices]
            row = {"dropped": k, "order": order,
                   "layers": "; ".join(",".join(n.rsplit(".", 1)[-1] for n in c) for c in choices),
                   "mean_cosine": statistics.fmean(r["mean_cosine"] for r in results),
                   "nn_agreement_pct": statistics.fmean(r["nn_agreement_pct"] for r in results),
                   "ideal_ratio": (len(names) - k) / len(names)}
            if order == "lowest BI":
                with torch.inference_mode():
                    ms = model_latency_ms({"dense": BatchEncoder(dense, timing_batch),
                                           "dropped": BatchEncoder(results[0]["model"], timing_batch)}, torch.zeros(1), 9)
                row.update(latency_ratio=ms["dropped"] / ms["dense"], latency_dense_ms=ms["dense"],
                           latency_dropped_ms=ms["dropped"])
            rows.append(row)
            print(f"drop {k} ({order}: {row['layers']}): mean cosine {row['mean_cosine']:.4f}, NN agreement "
                  f"{row['nn_agreement_pct']:.1f}%" + (f", latency x{row['latency_ratio']:.2f}" if "latency_ratio" in row
                                                         else ""), flush=True)

    def get(k: int, order: str) -> dict:
        return next(r for r in rows if r["dropped"] == k and r["order"] == order)

    targets = []
    for k in DEPTHS:
        bi = get(k, "lowest BI")
        rivals = max(get(k, "random")["mean_cosine"], get(k, "last layers")["mean_cosine"])
        targets.append(target(f"drop {k}: BI mean cosine - best of random/last", round(bi["mean_cosine"] - rivals, 4),
                              ">= 0", bi["mean_cosine"] >= rivals))
        share = bi["latency_ratio"] / bi["ideal_ratio"]
        targets.append(target(f"drop {k}: latency ratio / ((6-k)/6)", round(share, 3), "0.75 .. 1.25",
                              0.75 <= share <= 1.25))
    record = {
        "config": {"model": "all-MiniLM-L6-v2", "calibration_lines": len(calib_text), "evaluation_lines": len(lines),
                   "timing_batch": 64, "threads": torch.get_num_threads(), "quick": args.quick},
        "seeds": [0], "random_seeds": list(RANDOM_SEEDS),
        "environment": benchmark_environment(),
        "columns": COLUMNS,
        "rows": rows,
        "block_influence": scores,
        "targets": targets,
        "total_wall_time_s": time.perf_counter() - started,
    }
    publish("layer_dropping", record, args.out, plot=lambda png: plot(rows, png))
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
