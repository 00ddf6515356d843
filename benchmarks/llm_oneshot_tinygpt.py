"""One-shot LLM pruning on a char-level GPT: magnitude vs Wanda vs SparseGPT at 50%, 4:8 and 2:4.

SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", ICML 2023) and Wanda (Sun, Liu, Bair & Kolter, "A Simple and
Effective Pruning Approach for Large Language Models", ICLR 2024) prune every Linear layer
of the transformer blocks from a small calibration set, with no retraining; Tables 2-3 of
the Wanda paper report that both keep the perplexity of LLaMA close to dense at 50% while
magnitude pruning collapses, and that Wanda prunes much faster than SparseGPT (no weight
update, no Hessian inverse).  This script repeats that comparison in miniature on the
nanoGPT-style Tiny Shakespeare char-GPT of :mod:`prunelab.bench.chargpt` (0.82M
parameters; trained once and cached, see ``benchmarks/train_chargpt.py``).

Calibration: ``--calib-samples`` (64) random 64-character windows of the training split.
Evaluation: perplexity ``exp(mean next-character loss)`` on consecutive 64-character
windows of the validation split (all 1,742 of them; 256 with ``--quick``).  The
``lm_head`` stays dense, as in both papers.

Each method also runs with the engine's ``bias_correction`` (``b += (W - W') E[x]`` per
pruned layer, Nagel et al. 2019), in rows labelled ``+ bias corr.``; the targets are on
the plain methods, as published.  SparseGPT also runs with the engine's ``dense_targets``
(``sparsegpt + dense targets``: each layer reconstructs the dense model's outputs from the
pruned model's inputs, ``min ||W X - W' X~||^2``, Li et al. 2025, GPTAQ); measured while
adding it, its perplexity increase at 50% is 0.129 against plain SparseGPT's 0.373
(magnitude 0.892), and 0.220 against 0.518 at 2:4.  Its target row is shown beside the
plain methods'.  Its ``max layer err`` is measured against the dense model's layer
outputs (what it reconstructs), so it includes the drift of the inputs from earlier pruned
layers and is not comparable with the other rows' errors on their own inputs.

Targets: at 50% unstructured sparsity, SparseGPT's and Wanda's perplexity increase over
dense are each at most one third of magnitude's; Wanda prunes at least 10x faster than
SparseGPT, timed as Sun et al. 2023 (Table 4) time it: the accumulated time for computing
the pruning metric (and, for SparseGPT, its weight update) over all layers, *excluding*
the calibration forward passes both methods share (``solver s``).  The whole
``prune_oneshot`` wall time, forward passes included, is reported beside it (``prune s``)
and judged by the same 10x as a second target, since the issue speaks of "pruning wall
time": on a model this small those forward passes dominate and the whole-run ratio is far
smaller.  Each time is one sequential run per method (not interleaved repetitions), so the
millisecond solver times carry noise.

    python benchmarks/llm_oneshot_tinygpt.py           # writes benchmarks/results/llm_oneshot_tinygpt.json
    python benchmarks/llm_oneshot_tinygpt.py --quick   # 200-iteration model, 50% and 2:4 only
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time

from prunelab.bench.chargpt import evaluate_loss, load_or_train_chargpt
from prunelab.bench.records import (
    benchmark_args, benchmark_environment, publish, resolve_data_dir, run_guarded, target,
)
from prunelab.bench.text import (
    calibration_sequences,
    eval_windows,
    load_tinyshakespeare,
)
from prunelab.bench.oneshot_variants import variant_configs
from prunelab.measure.memory import peak_rss_mb
from prunelab.oneshot import OneShotConfig, prune_oneshot
from prunelab.oneshot.diagnostics import input_norm_spread, spread_summary

SETTINGS = (("50%", 0.5, None), ("4:8", 0.5, "4:8"), ("2:4", 0.5, "2:4"))
QUICK_SETTINGS = (("50%", 0.5, None), ("2:4", 0.5, "2:4"))
COLUMNS = [("method", "method"), ("sparsity", "sparsity"), ("sparsity_pct", "achieved %"),
           ("val_loss", "val loss"), ("val_ppl", "val ppl"), ("ppl_increase", "ppl increase"),
           ("prune_time_s", "prune s"), ("solver_time_s", "solver s"), ("max_layer_error", "max layer err")]



def _why_not(targets: list[dict], rows: list[dict], spread: dict[str, float]) -> str:
    """A reading of missed quality targets from this run's own numbers."""
    if all(t["met"] for t in targets if "ppl increase" in t["name"]):
        return ""
    magnitude = next(r for r in rows if r["method"] == "magnitude" and r["sparsity"] == "50%")
    dense = rows[0]["val_ppl"]
    return (f"Magnitude pruning to 50% costs this 0.8M-parameter char-GPT only +{magnitude['ppl_increase']:.2f} "
            f"perplexity (+{100 * magnitude['ppl_increase'] / dense:.0f}%), against +9.77 (+191%) on LLaMA-2-7B, "
            "where the one-third target comes from. Wanda's edge over magnitude rests on outlier input features "
            "(Dettmers et al. 2022), which this small model does not have: over calibration data the largest "
            "input-feature norm of a Linear is only "
            f"{spread['median_over_layers']:.1f}x its median (median over layers; max {spread['max_over_layers']:.1f}x), "
            "so |W| * ||X|| ranks weights almost as |W| does. SparseGPT's perplexity increase, as a share of "
            "magnitude's: " + ", ".join(f"{label} {100 * share:.0f}%" for label, share in _shares(rows, "sparsegpt")) + "."
            + _with_correction(rows, magnitude)
            + " With dense targets, SparseGPT's share: "
            + ", ".join(f"{label} {100 * share:.0f}%" for label, share in _shares(rows, "sparsegpt + dense targets")) + ".")


def _with_correction(rows: list[dict], magnitude: dict) -> str:
    """The 50% shares of the bias-corrected methods (of plain magnitude's increase), if they ran."""
    corrected = [r for r in rows if r["method"].endswith("+ bias corr.") and r["sparsity"] == "50%"]
    if not corrected or magnitude["ppl_increase"] <= 0:
        return ""
    shown = ", ".join(f"{r['method'].split()[0]} {100 * r['ppl_increase'] / magnitude['ppl_increase']:.0f}%"
                      for r in corrected)
    return f" With bias correction, as a share of plain magnitude's increase at 50%: {shown}."


def _shares(rows: list[dict], method: str) -> list[tuple[str, float]]:
    """``(setting, method's ppl increase / magnitude's)`` for every setting run."""
    out = []
    for r in rows:
        if r["method"] == method:
            base = next(m for m in rows if m["method"] == "magnitude" and m["sparsity"] == r["sparsity"])
            out.append((r["sparsity"], r["ppl_increase"] / base["ppl_increase"] if base["ppl_increase"] > 0 else 0.0))
    return out


def main(argv=None) -> int:
    parser = benchmark_args(__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=64, help="calibration windows of 64 characters")
    parser.add_argument("--eval-windows", type=int, default=None,
                        help="validation windows to evaluate (default: all; 256 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    data_dir = resolve_data_dir(args.data_dir)
    corpus = load_tinyshakespeare(data_dir)
    dense, meta = load_or_train_chargpt(data_dir, quick=args.quick)
    block = dense.config.block_size
    eval_count = args.eval_windows or (256 if args.quick else None)
    x, y = eval_windows(corpus.val, block, eval_count)  # (W, T), (W, T)
    calibration = calibration_sequences(corpus, args.calib_samples, block, seed=args.seed)
    print(f"char-GPT {dense.num_params():,} parameters ({'cached' if meta['cached'] else 'trained now'}, "
          f"{meta['train_config']['iters']} iterations); evaluating on {x.shape[0]} validation windows")

    spread = input_norm_spread(dense, calibration)  # outlier features? (what Wanda's gain rests on)
    base = evaluate_loss(dense, x, y)
    rows = [{"method": "dense", "sparsity": "0%", "sparsity_pct": 0.0, "val_loss": base["loss"],
             "val_ppl": base["perplexity"], "ppl_increase": 0.0}]
    settings = QUICK_SETTINGS if args.quick else SETTINGS
    reports = {}
    for label, sparsity, pattern in settings:
        for name, config in variant_configs(sparsity, pattern):
            model = copy.deepcopy(dense)
            report = prune_oneshot(model, calibration, config, progress=False)
            result = evaluate_loss(model, x, y)
            rows.append({"method": name, "sparsity": label, "sparsity_pct": 100 * report.sparsity,
                         "val_loss": result["loss"], "val_ppl": result["perplexity"],
                         "ppl_increase": result["perplexity"] - base["perplexity"],
                         "prune_time_s": report.wall_time_s, "solver_time_s": sum(r.solve_seconds for r in report.rows),
                         "max_layer_error": max(r.error for r in report.rows)})
            reports[(name, label)] = report.to_dict()
            print(f"{label:>4} {name:<24} ppl {result['perplexity']:.3f} (dense {base['perplexity']:.3f}) "
                  f"in {report.wall_time_s:.2f} s")
            del model

    def row(method: str, label: str = "50%") -> dict:
        return next(r for r in rows if r["method"] == method and r["sparsity"] == label)

    magnitude_increase = row("magnitude")["ppl_increase"]
    targets = []
    for method in ("sparsegpt", "wanda", "sparsegpt + dense targets"):
        increase = row(method)["ppl_increase"]
        ratio = increase / magnitude_increase if magnitude_increase > 0 else float("inf")
        targets.append(target(f"{method} ppl increase / magnitude's at 50%", round(ratio, 4), "<= 0.333",
                              ratio <= 1 / 3))
    speedup = row("sparsegpt")["solver_time_s"] / row("wanda")["solver_time_s"]
    targets.append(target("Wanda speed-up over SparseGPT at 50% (x, pruning-metric time, Sun et al. Table 4)",
                          round(speedup, 2), ">= 10", speedup >= 10))
    whole = row("sparsegpt")["prune_time_s"] / row("wanda")["prune_time_s"]
    targets.append(target("Wanda speed-up over SparseGPT at 50% (x, whole pruning wall time, calibration forwards "
                          "included: the issue's wording)", round(whole, 2), ">= 10", whole >= 10))
    notes = _why_not(targets, rows, spread_summary(spread))
    if notes:
        print(notes)
    peak = peak_rss_mb()
    record = {
        "config": {"model": meta["model_args"], "train": meta["train_config"], "model_sha256": meta["sha256"],
                   "calibration": {"samples": args.calib_samples, "length": block, "split": "train",
                                   "seed": args.seed},
                   "evaluation": {"split": "val", "windows": int(x.shape[0]), "length": block},
                   "oneshot": dataclasses.asdict(OneShotConfig()), "quick": args.quick},
        "seeds": [args.seed],
        "environment": benchmark_environment(),
        "columns": COLUMNS,
        "rows": rows,
        "targets": targets,
        "dense": {"train_metrics": meta.get("metrics", {}), "val_loss": base["loss"], "val_ppl": base["perplexity"]},
        "layers": {f"{m} {label}": rep["rows"] for (m, label), rep in reports.items()},
        "input_norm_spread": {"summary": spread_summary(spread), "layers": spread},
        "notes": notes,
        "peak_rss_mb": peak,
        "total_wall_time_s": time.perf_counter() - started,
    }
    publish("llm_oneshot_tinygpt", record, args.out)
    print(f"peak RSS {peak:.0f} MB; total {record['total_wall_time_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
