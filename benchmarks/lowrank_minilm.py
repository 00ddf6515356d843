"""Low-rank factorisation vs pruning on a real sentence encoder (all-MiniLM-L6-v2), side by side.

The dense alternative to sparsity: every Linear of the 6 encoder layers becomes two thin
Linears holding ``keep`` of its weights (:func:`prunelab.lowrank.low_rank_model`), by plain
truncated SVD (Denton et al. 2014) or by the whitened, activation-aware SVD of SVD-LLM
(Wang et al. 2024), which minimises each layer's output error on calibration inputs.
Beside them, at the same weight budget (keep 0.5 = 50% sparsity): SparseGPT and Wanda
one-shot pruning (``prunelab.oneshot``), whose unstructured zeros give no dense speed-up.

Calibration: ``--calib-samples`` (512) Tiny Shakespeare training lines; evaluation, as in
``minilm_oneshot.py``: 1000 held-out lines, mean cosine to the dense sentence embeddings and
nearest-neighbour agreement; latency of the encoder on one batch of 64 lines vs dense
(side by side, interleaved medians).

Targets: the whitened SVD keeps a higher mean cosine than the plain SVD at every ``keep``
(SVD-LLM's claim); low-rank at keep 0.5 runs faster than dense (latency ratio < 1).  The
comparison with SparseGPT/Wanda is reported, not targeted.

    python benchmarks/lowrank_minilm.py           # writes benchmarks/results/lowrank_minilm.json
    python benchmarks/lowrank_minilm.py --quick   # 200 lines, 64 calibration lines
"""

from __future__ import annotations

import copy
import sys
import time

import torch

from prunelab.bench.minilm import (
    BatchEncoder, add_text_args, embed_sentences, minilm_and_text, nearest_neighbours, tokenized_batches,
)
from prunelab.bench.records import (
    benchmark_args, benchmark_environment, publish, run_guarded, target,
)
from prunelab.lowrank import low_rank_model
from prunelab.measure.latency import model_latency_ms
from prunelab.oneshot import OneShotConfig, prune_oneshot

KEEPS = (0.75, 0.5)
COLUMNS = [("method", "method"), ("keep_pct", "weights kept %"), ("mean_cosine", "mean cosine"),
           ("nn_agreement_pct", "NN agreement %"), ("latency_ratio", "latency x (batch 64)"), ("build_s", "build s")]


def main(argv=None) -> int:
    parser = benchmark_args(__doc__.splitlines()[0])
    add_text_args(parser)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    dense, tokenizer, calib_text, lines = minilm_and_text(args)
    calibration = tokenized_batches(tokenizer, calib_text, batch_size=16)
    reference = embed_sentences(dense, tokenizer, lines)  # (N, 384)
    reference_nn = nearest_neighbours(reference)
    timing_batch = dict(tokenizer(lines[:64], padding=True, truncation=True, max_length=256, return_tensors="pt"))

    def measure(method: str, keep: float, model: torch.nn.Module, build_s: float) -> dict:
        emb = embed_sentences(model, tokenizer, lines)
        with torch.inference_mode():
            ms = model_latency_ms({"dense": BatchEncoder(dense, timing_batch), "new": BatchEncoder(model, timing_batch)},
                                  torch.zeros(1), 9)
        row = {"method": method, "keep_pct": 100 * keep, "mean_cosine": float((emb * reference).sum(1).mean()),
               "nn_agreement_pct": 100 * float((nearest_neighbours(emb) == reference_nn).float().mean()),
               "latency_ratio": ms["new"] / ms["dense"], "latency_dense_ms": ms["dense"], "latency_ms": ms["new"],
               "build_s": build_s}
        print(f"{method:<22} keep {100 * keep:.0f}%: mean cosine {row['mean_cosine']:.4f}, NN agreement "
              f"{row['nn_agreement_pct']:.1f}%, latency x{row['latency_ratio']:.2f}", flush=True)
        return row

    rows, ranks = [], {}
    for keep in KEEPS:
        for method, data in (("low-rank SVD", None), ("low-rank whitened SVD", calibration)):
            model = copy.deepcopy(dense)
            tick = time.perf_counter()
            report = low_rank_model(model, keep, data)
            rows.append(measure(method, report.keep, model, time.perf_counter() - tick))
            ranks[f"{method} {keep:g}"] = report.ranks
    for method in ("sparsegpt", "wanda"):
        model = copy.deepcopy(dense)
        tick = time.perf_counter()
        prune_oneshot(model, calibration, OneShotConfig(method=method, sparsity=0.5), progress=False)
        rows.append(measure(f"{method} 50% (pruned)", 0.5, model, time.perf_counter() - tick))

    def get(method: str, keep: float) -> dict:
        return next(r for r in rows if r["method"] == method and abs(r["keep_pct"] - 100 * keep) < 1.0)

    targets = []
    for keep in KEEPS:
        plain, aware = get("low-rank SVD", keep), get("low-rank whitened SVD", keep)
        gain = aware["mean_cosine"] - plain["mean_cosine"]
        targets.append(target(f"keep {keep:g}: whitened - plain SVD mean cosine", round(gain, 4), "> 0", gain > 0))
    half = get("low-rank whitened SVD", 0.5)
    targets.append(target("low-rank keep 0.5: latency ratio vs dense (batch 64)", round(half["latency_ratio"], 3), "< 1",
                          half["latency_ratio"] < 1.0))
    record = {
        "config": {"model": "all-MiniLM-L6-v2", "keeps": list(KEEPS), "calibration_lines": len(calib_text),
                   "evaluation_lines": len(lines), "timing_batch": 64, "threads": torch.get_num_threads(),
                   "quick": args.quick},
        "seeds": [0],
        "environment": benchmark_environment(),
        "columns": COLUMNS,
        "rows": rows,
        "ranks": ranks,
        "targets": targets,
        "total_wall_time_s": time.perf_counter() - started,
    }
    publish("lowrank_minilm", record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
