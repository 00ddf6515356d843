"""2:4 sparse tensor cores on an NVIDIA GPU: ``materialise(form="2:4")`` vs dense, side by side.

Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks" (arXiv:2104.08378): in the
2:4 pattern (two nonzeros in every group of four consecutive input weights) Ampere and
newer sparse tensor cores skip the zeros, so a GEMM ``Y = X W^T`` does half the
multiply-adds; they report up to 2x on the math and about 1.3-1.6x on large GEMMs.
PyTorch reaches these kernels through ``torch.sparse.to_sparse_semi_structured``
(cuSPARSELt, or CUTLASS), which prunelab's ``SemiStructuredLinear`` calls on CUDA.

What one run measures, on one CUDA device of compute capability >= 8.0:

1. **Layers.** For each Linear shape (in -> out) and dtype (fp16, bf16) and token count,
   a magnitude 2:4 mask, ``materialise(layer, "2:4")``, then: did the layer run on the
   sparse kernels (``accelerated``, no dense fallback), the max abs difference from the
   masked dense ``F.linear`` relative to the output scale, and the median latency of
   dense vs 2:4 (interleaved repetitions, ``torch.cuda.synchronize`` before every clock
   read) with the ratio.
2. **fp32.** Whether the backend takes fp32 weights (cuSPARSELt does not, CUTLASS does);
   a refusal must fall back to dense with unchanged outputs, never fail.
3. **Model.** A 4-layer, 4096-wide fp16 MLP pruned 2:4 by magnitude and materialised as a
   whole: outputs vs the masked model, latency ratio at the largest token count.

Targets: every fp16/bf16 layer accelerated; relative error <= 1e-2 (half-precision
accumulation order differs between the kernels); 2:4 faster than dense (>= 1.1x) on the
largest fp16 shape at the two largest token counts; the MLP faster than dense.

On a machine without such a GPU the script says so in one line and exits 2, writing
nothing.  It needs about a minute on an H100/H200 (``--quick``: a few seconds).

    python benchmarks/gpu_semi_structured.py            # writes benchmarks/results/gpu_semi_structured.json
    python benchmarks/gpu_semi_structured.py --quick --out "$OUT"

On a lent device machine (its image has CUDA PyTorch; nothing to install), from the
repository root: ``PYTHONPATH=src PYTHONUNBUFFERED=1 python3 benchmarks/gpu_semi_structured.py --out $OUT``,
then copy the record into ``benchmarks/results/``.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import torch
from torch import nn

from prunelab.bench.records import benchmark_args, benchmark_environment, publish, run_guarded, target
from prunelab.errors import PrunelabError
from prunelab.masks import MaskSet
from prunelab.materialise import materialise, semi_structured_available
from prunelab.measure.latency import interleaved_latency
from prunelab.structure import NM

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192))  # (in, out), LLaMA-7B-like
TOKENS = (64, 512, 4096, 16384)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
REL_TOL = 1e-2
COLUMNS = [("dtype", "dtype"), ("shape", "in -> out"), ("tokens", "tokens"), ("accelerated", "2:4 kernel"),
           ("rel_error", "rel. error"), ("dense_ms", "dense ms"), ("sparse_ms", "2:4 ms"), ("speedup_x", "speedup x")]


def pruned_linear(in_features: int, out_features: int, dtype: torch.dtype, device: torch.device,
                  seed: int) -> nn.Sequential:
    """``Sequential(Linear)`` whose weight is magnitude-pruned to 2:4 (materialise targets submodules)."""
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        layer.weight.mul_(NM(2, 4).pattern_mask(layer.weight.abs()))
    return nn.Sequential(layer)


def relative_error(reference: torch.Tensor, got: torch.Tensor) -> float:
    """``max |ref - got| / max(max |ref|, 1)`` in fp32 -- materialise's own acceptance measure."""
    ref, out = reference.float(), got.float()
    return float((ref - out).abs().max()) / max(float(ref.abs().max()), 1.0)


def time_pair(dense: nn.Module, sparse: nn.Module, x: torch.Tensor, reps: int) -> tuple[float, float]:
    with torch.inference_mode():
        seconds = interleaved_latency({"dense": lambda: dense(x), "sparse": lambda: sparse(x)}, reps=reps,
                                      min_sample_s=5e-3, warmup=3, sync=torch.cuda.synchronize)
    return 1000.0 * seconds["dense"], 1000.0 * seconds["sparse"]


def materialise_24(model: nn.Module, example: torch.Tensor) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dense-fallback warning is read from the report instead
        return materialise(model, "2:4", example_input=example, tolerance=REL_TOL)


def layer_rows(device: torch.device, shapes, tokens, dtypes, reps: int) -> list[dict]:
    rows = []
    for dtype_name, dtype in dtypes.items():
        for in_f, out_f in shapes:
            dense = pruned_linear(in_f, out_f, dtype, device, seed=0)
            sparse = materialise_24(dense, torch.randn(64, in_f, device=device, dtype=dtype))
            accelerated = bool(sparse[0].accelerated)
            for n in tokens:
                x = torch.randn(n, in_f, device=device, dtype=dtype)
                with torch.inference_mode():
                    error = relative_error(dense(x), sparse(x))
                dense_ms, sparse_ms = time_pair(dense, sparse, x, reps)
                rows.append({"dtype": dtype_name, "shape": f"{in_f} -> {out_f}", "in": in_f, "out": out_f,
                             "tokens": n, "accelerated": accelerated, "rel_error": error, "dense_ms": dense_ms,
                             "sparse_ms": sparse_ms, "speedup_x": dense_ms / sparse_ms})
                print(f"{dtype_name} {in_f}->{out_f} tokens {n}: {'2:4' if accelerated else 'DENSE FALLBACK'} "
                      f"rel.err {error:.1e}, dense {dense_ms:.3f} ms, 2:4 {sparse_ms:.3f} ms "
                      f"({dense_ms / sparse_ms:.2f}x)", flush=True)
    return rows


def fp32_check(device: torch.device) -> dict:
    dense = pruned_linear(1024, 1024, torch.float32, device, seed=1)
    x = torch.randn(256, 1024, device=device)
    sparse = materialise_24(dense, x)
    with torch.inference_mode():
        error = relative_error(dense(x), sparse(x))
    return {"accelerated": bool(sparse[0].accelerated), "rel_error": error,
            "notes": list(sparse.materialise_report.notes)}


def mlp_check(device: torch.device, tokens: int, reps: int, width: int = 4096, depth: int = 4) -> dict:
    torch.manual_seed(2)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(width, width)] + ([nn.ReLU()] if i < depth - 1 else [])
    model = nn.Sequential(*layers).to(device=device, dtype=torch.float16).eval()
    masks = MaskSet({f"{name}.weight": NM(2, 4).pattern_mask(module.weight.detach().abs())
                     for name, module in model.named_modules() if isinstance(module, nn.Linear)})
    masks.apply_(model)
    x = torch.randn(tokens, width, device=device, dtype=torch.float16)
    sparse = materialise_24(model, x[:64])
    with torch.inference_mode():
        error = relative_error(model(x), sparse(x))
    dense_ms, sparse_ms = time_pair(model, sparse, x, reps)
    kernels = [f.note or f.kernel for f in sparse.materialise_report.layers]
    return {"width": width, "depth": depth, "tokens": tokens, "kernels": kernels, "rel_error": error,
            "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup_x": dense_ms / sparse_ms}


def main(argv=None) -> int:
    parser = benchmark_args(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise PrunelabError("this benchmark needs a CUDA GPU and torch.cuda.is_available() is False; run it on a "
                            "machine with an NVIDIA Ampere or newer GPU (compute capability >= 8.0)")
    device = torch.device("cuda")
    if not semi_structured_available(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise PrunelabError(f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}; 2:4 sparse "
                            "tensor cores need >= 8.0 (Ampere or newer)")
    quick = args.quick
    started = time.perf_counter()
    shapes = SHAPES[:1] if quick else SHAPES
    tokens = TOKENS[1:3] if quick else TOKENS
    reps = 5 if quick else 25
    rows = layer_rows(device, shapes, tokens, DTYPES, reps)
    fp32 = fp32_check(device)
    mlp = mlp_check(device, tokens[-1], reps)
    print(f"MLP {mlp['depth']}x{mlp['width']} fp16, tokens {mlp['tokens']}: rel.err {mlp['rel_error']:.1e}, "
          f"{mlp['speedup_x']:.2f}x ({', '.join(mlp['kernels'])})", flush=True)

    largest = max(shapes, key=lambda s: s[0] * s[1])
    big = [r for r in rows if r["dtype"] == "fp16" and (r["in"], r["out"]) == largest and r["tokens"] in tokens[-2:]]
    worst_error = max(max(r["rel_error"] for r in rows), mlp["rel_error"])
    targets = [
        target("fp16/bf16 layers on the 2:4 kernels (share)", statistics.fmean(r["accelerated"] for r in rows), "= 1",
               all(r["accelerated"] for r in rows)),
        target("max relative error vs masked dense", worst_error, f"<= {REL_TOL:g}", worst_error <= REL_TOL),
        target(f"2:4 speedup, fp16 {largest[0]} -> {largest[1]}, tokens {tokens[-2]} and {tokens[-1]} (min)",
               round(min(r["speedup_x"] for r in big), 3), ">= 1.1", min(r["speedup_x"] for r in big) >= 1.1),
        target(f"MLP speedup at {mlp['tokens']} tokens", round(mlp["speedup_x"], 3), "> 1", mlp["speedup_x"] > 1.0),
        target("fp32 falls back without changing outputs (rel. error)", fp32["rel_error"], f"<= {REL_TOL:g}",
               fp32["rel_error"] <= REL_TOL),
    ]
    environment = {**benchmark_environment(), "gpu": torch.cuda.get_device_name(device),
                   "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
                   "cuda": torch.version.cuda, "cusparselt": bool(torch.backends.cusparselt.is_available())}
    record = {"config": {"shapes": [list(s) for s in shapes], "tokens": list(tokens), "dtypes": list(DTYPES),
                         "reps": reps, "quick": quick},
              "seeds": [0, 1, 2],  # weight draws of the shape sweep, the fp32 check and the MLP
              "environment": environment, "columns": COLUMNS, "rows": rows, "fp32": fp32, "mlp": mlp,
              "targets": targets, "total_wall_time_s": time.perf_counter() - started}
    publish("gpu_semi_structured", record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
