"""CPU speedup of sparse materialisation: dense vs prunelab ``auto`` vs plain torch.sparse CSR.

Issue 3 ("Make sparsity pay") targets, on the CPU at ``torch.get_num_threads()`` threads:
an MLP of 4096x4096 Linear layers at 90% unstructured sparsity, batch 1, is >= 3x
faster than dense; at 95% >= 5x; and the ``auto`` form is never slower than dense at any
sparsity.  That last target is judged over all rows, as the issue states it, and again over
the rows where ``auto`` chose a sparse kernel for some layer: where it kept every layer
dense, its model is the dense computation, and the measured ratio (recorded in ``notes``)
is the run's timing noise.  Also LeNet-300-100 (``lenet300``; untrained weights -- latency does not depend
on training).  Each layer is pruned by magnitude to the same sparsity (50/80/90/95/99%
unstructured, and 2:4 = 50% in NVIDIA's pattern).

Latency is measured side by side in one run: for every repetition each variant runs once
(interleaved), a repetition of a fast variant loops enough calls to last >= 1 ms, and
the table holds medians.  ``ideal_x`` is ``1 / (1 - sparsity)``, the speedup if time
were proportional to nonzeros.  "torch CSR" is what a user gets from plain torch:
``F.linear(x, W.to_sparse_csr(), b)`` (int64 indices).  ``auto`` is
``materialise(model, "auto", example_input=..., batch_sizes=(1, 64))``.

Threads: the run uses ``torch.get_num_threads()`` (``--threads N`` to change it) and
records it, with the machine's load average at start and end.  When other processes keep
the cores busy (load above the core count), 2-thread MKL sparse calls stall for
scheduler ticks and dense slows down several-fold, so ratios from a loaded machine are
not meaningful; ``auto`` then mostly picks dense (see ``prunelab.materialise.sparse_modules``).

    python benchmarks/cpu_speedup.py            # full run, writes benchmarks/results/cpu_speedup.json
    python benchmarks/cpu_speedup.py --quick    # 90/95% on the MLP, 90% on LeNet-300-100, < 1 minute
    python benchmarks/cpu_speedup.py --threads 1   # the same at one thread (see "Threads" above)
"""

from __future__ import annotations

import copy
import functools
import os
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.bench.models import build_model
from prunelab.measure.latency import interleaved_latency
from prunelab.bench.records import (
    benchmark_args, benchmark_environment, rows_table, run_guarded, target, targets_table, write_record,
)
from prunelab.masks import MaskSet
from prunelab.materialise import materialise
from prunelab.materialise.autotune import median_timer
from prunelab.structure import NM

COLUMNS = [
    ["model", "model"], ["sparsity", "sparsity"], ["batch", "batch"], ["dense_ms", "dense ms"],
    ["auto_ms", "auto ms"], ["torch_csr_ms", "torch CSR ms"], ["auto_speedup_x", "auto x"],
    ["torch_csr_speedup_x", "torch CSR x"], ["ideal_x", "ideal x"], ["kernels", "auto kernels"],
]


class TorchCSRLinear(nn.Module):
    """The plain-torch baseline: ``F.linear`` with a ``to_sparse_csr()`` weight (int64 indices)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight.detach().to_sparse_csr()  # (out, in) sparse_csr
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, out)
        return F.linear(x, self.weight, self.bias)


def mlp4096(layers: int = 3) -> nn.Module:
    """``layers`` Linear(4096, 4096) with ReLU between them (~201 MB of fp32 weights for 3)."""
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(4096, 4096)] + ([nn.ReLU()] if i < layers - 1 else [])
    return nn.Sequential(*mods)


def magnitude_masks(model: nn.Module, sparsity: float | str) -> MaskSet:
    """Per-layer magnitude masks: ``sparsity`` of every Linear weight pruned, or the 2:4 pattern."""
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            w = module.weight.detach().abs()
            if sparsity == "2:4":
                masks[f"{name}.weight"] = NM(2, 4).pattern_mask(w)
            else:
                k = round(float(sparsity) * w.numel())
                threshold = w.flatten().kthvalue(k).values if k > 0 else w.min() - 1
                masks[f"{name}.weight"] = w > threshold
    return MaskSet(masks)


def torch_csr_model(pruned: nn.Module) -> nn.Module:
    """A copy of ``pruned`` with every Linear as :class:`TorchCSRLinear`."""
    model = copy.deepcopy(pruned).eval()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, TorchCSRLinear(module))
    return model


def kernel_summary(model: nn.Module) -> str:
    kernels = [layer.kernel for layer in model.materialise_report.layers]
    return ",".join(kernels)


def run_case(name: str, model: nn.Module, input_shape: tuple[int, ...], sparsity: float | str, batches: tuple[int, ...],
             reps: int, seed: int, timer: Callable | None) -> tuple[list[dict], float]:
    torch.manual_seed(seed)
    masks = magnitude_masks(model, sparsity)
    pruned = masks.apply_(model).eval()
    inputs = {b: torch.randn(b, *input_shape) for b in batches}
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "sparse CSR is in beta" notice
        auto = materialise(pruned, "auto", masks=masks, example_input=inputs[1][:1], batch_sizes=batches,
                          timer=timer)
        plain = torch_csr_model(pruned)
    tune_s = time.perf_counter() - started
    rows = []
    ideal = 2.0 if sparsity == "2:4" else 1.0 / (1.0 - float(sparsity))
    for b in batches:
        x = inputs[b]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            variants = {"dense": functools.partial(pruned, x), "auto": functools.partial(auto, x),
                        "torch_csr": functools.partial(plain, x)}
            times = interleaved_latency(variants, reps)
        rows.append({
            "model": name, "sparsity": sparsity if sparsity == "2:4" else f"{100 * float(sparsity):g}%",
            "sparsity_pct": 50.0 if sparsity == "2:4" else 100 * float(sparsity), "batch": b,
            "dense_ms": 1e3 * times["dense"], "auto_ms": 1e3 * times["auto"], "torch_csr_ms": 1e3 * times["torch_csr"],
            "auto_speedup_x": times["dense"] / times["auto"], "torch_csr_speedup_x": times["dense"] / times["torch_csr"],
            "ideal_x": ideal, "kernels": kernel_summary(auto), "auto_tune_s": tune_s,
            "max_abs_error": auto.materialise_report.max_abs_error,
        })
    return rows, tune_s


def main(argv=None) -> int:
    parser = benchmark_args(__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch.get_num_threads())")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    if load_start > (os.cpu_count() or 1):
        print(f"warning: load average {load_start:.1f} exceeds the {os.cpu_count()} cores -- other processes compete "
              "for the CPU and the latency ratios below will not be meaningful", file=sys.stderr)
    batches = (1, 64)
    if args.quick:
        cases = [("mlp4096", s) for s in (0.9, 0.95)] + [("lenet300", 0.9)]
        reps, timer = 5, functools.partial(median_timer, warmup=1, repeats=3)
    else:
        levels = (0.5, 0.8, 0.9, 0.95, 0.99, "2:4")
        cases = [("mlp4096", s) for s in levels] + [("lenet300", s) for s in levels]
        reps, timer = 21, None  # None: autotune's default median_timer
    rows = []
    for name, sparsity in cases:
        torch.manual_seed(args.seed)
        if name == "mlp4096":
            model, shape = mlp4096(), (4096,)
        else:
            model, shape = build_model("lenet300", (1, 28, 28), 10), (1, 28, 28)
        case_rows, tune_s = run_case(name, model, shape, sparsity, batches, reps, args.seed, timer)
        rows += case_rows
        print(f"  {name} {sparsity}: auto-tuned in {tune_s:.1f}s, kernels {case_rows[0]['kernels']}", file=sys.stderr)
        del model

    def speedup(model: str, pct: float, batch: int) -> float | None:
        hits = [r["auto_speedup_x"] for r in rows if r["model"] == model and r["sparsity_pct"] == pct
                and r["batch"] == batch and r["sparsity"] != "2:4"]
        return round(hits[0], 2) if hits else None

    targets = []
    for pct, wanted in ((90.0, 3.0), (95.0, 5.0)):
        value = speedup("mlp4096", pct, 1)
        if value is not None:
            targets.append(target(f"MLP 4096 at {pct:g}% batch 1: auto speedup", value, f">= {wanted:g}x",
                                  value >= wanted))
    # Where auto kept every layer dense it runs the very computation of "dense": those ratios show only
    # this run's timing noise, so the target judges the rows where auto chose a sparse kernel.
    chose_sparse = [r for r in rows if any(k != "dense" for k in r["kernels"].split(","))]
    kept_dense = [r["auto_speedup_x"] for r in rows if r not in chose_sparse]
    overall = min(r["auto_speedup_x"] for r in rows)
    targets.append(target("auto never slower than dense, min speedup over all rows (as the issue states it; "
                          "5% timing noise allowed)", round(overall, 3), ">= 0.95x", overall >= 0.95))
    slowest = min((r["auto_speedup_x"] for r in chose_sparse), default=None)
    if slowest is not None:
        targets.append(target("auto never slower than dense where it chose a sparse kernel (min speedup over "
                              f"those {len(chose_sparse)} rows; 5% timing noise allowed)",
                              round(slowest, 3), ">= 0.95x", slowest >= 0.95))
    notes = ""
    if kept_dense:
        notes = (f"In {len(kept_dense)} rows auto kept every layer dense, so its model computes exactly what dense "
                 f"does; their measured ratios, {min(kept_dense):.3f}x to {max(kept_dense):.3f}x, are this run's "
                 "timing noise; the second never-slower target leaves them out.")
    record = {
        "config": {"quick": args.quick, "batches": list(batches), "reps": reps, "layers": "3 x Linear(4096, 4096)",
                   "threads": torch.get_num_threads(),
                   # 1-minute load average of the machine: above the core count, other processes compete for
                   # the cores and multi-threaded sparse calls stall (see prunelab.materialise.sparse_modules)
                   "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0], "cores": os.cpu_count()},
        "seeds": [args.seed], "environment": benchmark_environment(), "columns": COLUMNS, "rows": rows,
        "targets": targets, "notes": notes, "wall_s": time.perf_counter() - started,
    }
    print(rows_table(rows, [tuple(c) for c in COLUMNS]))
    print()
    print(targets_table(targets))
    if notes:
        print(f"\n{notes}")
    print(f"\nthreads={torch.get_num_threads()}, load average {load_start:.1f} -> {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores, wall {record['wall_s']:.0f}s, written to "
          f"{write_record('cpu_speedup', record, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
