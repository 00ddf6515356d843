"""Sparse attention that is really faster: blocked causal sliding-window attention vs dense attention.

Child et al. 2019 ("Generating Long Sequences with Sparse Transformers") and Beltagy et al.
2020 (Longformer) restrict each query to a local window of keys, turning attention's
``T^2`` scores into ``T * window``.  :func:`prunelab.sparse_attention.local_attention`
computes that pattern in tiles of ``window / 4`` queries, each scoring only the keys its
window reaches (``1.25 T window`` scores), instead of masking a dense score matrix.  (The
first version used tiles of ``window`` queries, ``2 T window`` scores: at T = 4096, window
256 it was 1.3x faster than dense causal attention; quarter tiles measured 2.7x.)

Timed side by side (interleaved medians, batch 1, 4 heads of 64, fp32), per sequence length
and window: PyTorch's ``scaled_dot_product_attention`` with ``is_causal=True`` (its fastest
dense causal path), the same with the local pattern as a boolean mask (same outputs as
ours, dense cost), and the blocked local attention.  Outputs are compared with the masked
dense ones.

Also timed: :func:`prunelab.sparse_attention.block_local_attention` with ``block = window``
(own block causally plus the whole previous block), tiled the same way (each tile of a
block's queries scores the previous block and its own block up to its last query); its
outputs are compared with dense attention under its own mask.  (Its first version ran the
fused causal kernel on whole block pairs and threw half the queries away: 0.74x dense at
T = 4096, block 256.)

Targets: at T = 4096, window 256, sliding-window and block-local attention each at least
2x faster than dense causal attention; at every shape both match masked dense attention
(max abs error <= 1e-4).

    python benchmarks/sparse_attention.py           # writes benchmarks/results/sparse_attention.json
    python benchmarks/sparse_attention.py --quick   # T = 1024 only
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from prunelab.bench.records import benchmark_args, benchmark_environment, publish, run_guarded, target
from prunelab.measure.latency import interleaved_latency
from prunelab.sparse_attention import (
    block_local_attention, block_local_attention_mask, local_attention, local_attention_mask,
)

LENGTHS = (1024, 4096, 8192)
WINDOWS = (128, 256)
HEADS, DIM = 4, 64
COLUMNS = [("length", "T"), ("window", "window"), ("causal_ms", "dense causal ms"), ("masked_ms", "dense masked ms"),
           ("local_ms", "sliding local ms"), ("speedup_x", "sliding vs causal x"), ("block_local_ms", "block-local ms"),
           ("block_speedup_x", "block-local vs causal x"), ("score_ratio", "scores T^2/(2Tw)"),
           ("max_abs_error", "max abs err")]


def main(argv=None) -> int:
    parser = benchmark_args(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    started = time.perf_counter()
    lengths = LENGTHS[:1] if args.quick else LENGTHS
    rows = []
    for length in lengths:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, HEADS, length, DIM) for _ in range(3))  # (B, H, T, d)
        for window in WINDOWS:
            mask = local_attention_mask(length, window)
            with torch.inference_mode():
                reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                error = float((local_attention(q, k, v, window) - reference).abs().max())
                block_reference = F.scaled_dot_product_attention(q, k, v,
                                                                 attn_mask=block_local_attention_mask(length, window))
                error = max(error, float((block_local_attention(q, k, v, window) - block_reference).abs().max()))
                seconds = interleaved_latency({
                    "causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                    "masked": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                    "local": lambda: local_attention(q, k, v, window),
                    "block_local": lambda: block_local_attention(q, k, v, window),
                }, reps=9)
            row = {"length": length, "window": window, **{f"{n}_ms": 1000 * s for n, s in seconds.items()},
                   "speedup_x": seconds["causal"] / seconds["local"],
                   "block_speedup_x": seconds["causal"] / seconds["block_local"], "score_ratio": length / (2 * window),
                   "max_abs_error": error}
            rows.append(row)
            print(f"T {length} window {window}: causal {row['causal_ms']:.2f} ms, masked {row['masked_ms']:.2f} ms, "
                  f"local {row['local_ms']:.2f} ms (x{row['speedup_x']:.2f}), block-local {row['block_local_ms']:.2f} ms "
                  f"(x{row['block_speedup_x']:.2f}), max abs error {error:.1e}", flush=True)
    worst = max(r["max_abs_error"] for r in rows)
    targets = [target("max abs error vs masked dense attention", worst, "<= 1e-4", worst <= 1e-4)]
    key = next((r for r in rows if r["length"] == 4096 and r["window"] == 256), None)
    if key is not None:
        targets.insert(0, target("T 4096, window 256: local vs dense causal speed-up (x)", round(key["speedup_x"], 3),
                                 ">= 2", key["speedup_x"] >= 2.0))
        targets.insert(1, target("T 4096, block 256: block-local vs dense causal speed-up (x)",
                                 round(key["block_speedup_x"], 3), ">= 2", key["block_speedup_x"] >= 2.0))
    notes = ""
    if key is not None and key["speedup_x"] < 2.0:
        notes = (f"At T 4096 with window 256 the blocked local attention computes {key['score_ratio'] / 2:.0f}x fewer "
                 "scores than causal attention (which skips the upper half itself) but runs only "
                 f"x{key['speedup_x']:.2f} faster: it needs a boolean mask inside each block pair, and PyTorch's CPU "
                 "attention with a mask runs the unfused path (compare the dense masked column), while is_causal "
                 "takes the fused flash kernel. Block-local attention needs no mask but is slower still: it "
                 "copies q/k/v into overlapping block pairs and computes the first half of each pair only to "
                 "discard it, on many short sequences. The gain grows with T / window: see the other rows.")
    record = {
        "config": {"lengths": list(lengths), "windows": list(WINDOWS), "heads": HEADS, "head_dim": DIM, "batch": 1,
                   "dtype": "float32", "threads": torch.get_num_threads(), "quick": args.quick},
        "seeds": [0],
        "environment": benchmark_environment(),
        "columns": COLUMNS,
        "rows": rows,
        "targets": targets,
        "notes": notes,
        "total_wall_time_s": time.perf_counter() - started,
    }
    publish("sparse_attention", record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
