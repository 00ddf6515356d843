"""Regenerate the README's generated sections from real runs and benchmark records.

    python scripts/update_readme.py            # API example + CLI outputs + benchmark tables
    python scripts/update_readme.py --bench    # only the benchmark tables (from benchmarks/results/*.json)

Sections live between ``<!-- readme:NAME -->`` and ``<!-- /readme:NAME -->`` markers.
Every output shown is captured from the command as run here, never typed by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "src"))


def run(cmd: list[str], cwd: Path | None = None, check: bool = True) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, cwd=cwd or ROOT, capture_output=True, text=True, env=env)
    if check and done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return (done.stdout + done.stderr).rstrip()


def replace_section(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- readme:{name} -->\n).*?(<!-- /readme:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README has no readme:{name} markers")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def block(command: str, output: str) -> str:
    return f"```console\n$ {command}\n{output}\n```\n"


def _example(name: str) -> tuple[str, str]:
    """``(source, output)`` of ``examples/NAME``, run in a scratch folder."""
    source = (ROOT / "examples" / name).read_text()
    with tempfile.TemporaryDirectory() as tmp:
        output = run([sys.executable, str(ROOT / "examples" / name)], cwd=Path(tmp))
    return source, output


def api_section() -> str:
    source, output = _example("custom_model.py")
    oneshot_source, oneshot_output = _example("oneshot_transformer.py")
    return ("## Python API: your model, your training loop\n\n"
            "`examples/custom_model.py` prunes a small CNN that is not in the zoo, inside a plain PyTorch loop:\n\n"
            f"```python\n{source}```\n\nIts output:\n\n```text\n{output}\n```\n\n"
            "`examples/oneshot_transformer.py` prunes a pretrained Hugging Face model one-shot, with no training "
            "loop at all, and checks what it kept:\n\n"
            f"```python\n{oneshot_source}```\n\nIts output:\n\n```text\n{oneshot_output}\n```\n")


def cli_section() -> str:
    exe = [sys.executable, "-m", "prunelab.cli"]
    parts = ["## Command line\n"]
    parts.append("### `prunelab list`\n\nEvery registered criterion, granularity, allocation, method, schedule, model and dataset:\n")
    parts.append(block("prunelab list", run(exe + ["list"])))
    with tempfile.TemporaryDirectory() as tmp:
        demo_out = Path(tmp) / "demo"
        parts.append("### `prunelab demo`\n\nThe main job on the embedded digits data (progress bars go to the terminal "
                     "and are left out here). Writes `results.json`, `report.md`, `sparsity_curve.png` and a checkpoint.\n")
        output = run(exe + ["demo", "--no-progress", "--out", str(demo_out)])
        parts.append(block("prunelab demo --out runs/demo", output.replace(str(demo_out), "runs/demo")))
        parts.append("### `prunelab inspect`\n\nPer-layer sparsity of a saved checkpoint (model + masks):\n")
        parts.append(block("prunelab inspect runs/demo", run(exe + ["inspect", str(demo_out)]).replace(str(demo_out), "runs/demo")))
        prune_args = ["prune", "--model", "lenet5", "--dataset", "mnist", "--method", "oneshot", "--criterion", "l1",
                      "--granularity", "channel", "--allocation", "uniform", "--sparsity", "0.5", "--pretrain-epochs", "1",
                      "--finetune-epochs", "1", "--lr", "0.02", "--keep-last", "dense", "--no-progress"]
        data = ROOT.parent / "shared" / "data"
        if (data / "mnist").is_dir() or os.environ.get("PRUNELAB_DATA"):
            run_dir = Path(tmp) / "lenet5"
            extra = ["--data-dir", os.environ.get("PRUNELAB_DATA", str(data / "mnist"))]
            output = run(exe + prune_args + extra + ["--out", str(run_dir)])
            parts.append("### `prunelab prune`\n\nAny zoo model, dataset, criterion, granularity, allocation and method; "
                         "`--config run.yaml` takes the same keys (flags override it). Channel pruning of LeNet-5 on MNIST:\n")
            shown = " ".join(prune_args + ["--data-dir", "../shared/data/mnist", "--out", "runs/lenet5"])
            parts.append(block(f"prunelab {shown}", output.replace(str(run_dir), "runs/lenet5")))
        parts.append("### `prunelab lottery`\n\nLottery tickets (Frankle & Carbin 2019): IMP rewinding the survivors to "
                     "iteration `--rewind-iter` (0 = the initialisation; rewound to k, a round trains the remaining steps "
                     "k..T with the learning-rate schedule continued, Frankle et al. 2020), 20% of each hidden layer / "
                     "10% of the output layer per round, a random-reinitialisation control on every mask. Each finished round is kept in "
                     "the run folder; `--resume DIR` continues after the last one (only `--rounds` may change):\n")
        lot_out = Path(tmp) / "lottery"
        lot_args = ["lottery", "--model", "digits_mlp", "--dataset", "digits", "--rounds", "3", "--epochs", "3",
                    "--eval-every", "20", "--no-progress"]
        output = run(exe + lot_args + ["--out", str(lot_out)])
        parts.append(block("prunelab " + " ".join(lot_args + ["--out", "runs/lottery"]),
                           output.replace(str(lot_out), "runs/lottery")))
        output = run(exe + lot_args[:5] + ["--rounds", "4"] + lot_args[7:] + ["--resume", str(lot_out)])
        parts.append(block("prunelab " + " ".join(lot_args[:5] + ["--rounds", "4"] + lot_args[7:] + ["--resume", "runs/lottery"]),
                           output.replace(str(lot_out), "runs/lottery")))
        parts.append("### `prunelab compress`\n\nDeep Compression (Han et al. 2016) of a pruned checkpoint: k-means weight "
                     "sharing, centroid fine-tuning, relative indices, Huffman coding, one checksummed file; the error is "
                     "measured on the model decoded from the file, and the energy estimate uses Horowitz's 45 nm table:\n")
        plc = Path(tmp) / "demo.plc"
        output = run(exe + ["compress", str(demo_out), "--out", str(plc), "--finetune-epochs", "2", "--no-progress"])
        parts.append(block("prunelab compress runs/demo --out runs/demo.plc --finetune-epochs 2",
                           output.replace(str(plc), "runs/demo.plc").replace(str(demo_out), "runs/demo")))
        parts.append("### `prunelab materialise`\n\nTurns the masks into a model that is really cheaper. `auto` times dense, "
                     "CSR and BSR per layer and keeps a sparse kernel only where it is no slower (on this tiny MLP dense wins "
                     "everywhere); `shrink` physically removes pruned channels. Every form is checked against the masked "
                     "model on real test inputs; `prunelab.load(DIR)` rebuilds the result:\n")
        mat_out = Path(tmp) / "demo-auto"
        output = run(exe + ["materialise", str(demo_out), "--form", "auto", "--out", str(mat_out)])
        parts.append(block("prunelab materialise runs/demo --form auto --out runs/demo-auto",
                           output.replace(str(mat_out), "runs/demo-auto").replace(str(demo_out), "runs/demo")))
        parts.append("### `prunelab bench-latency`\n\nDense vs materialised, side by side (interleaved medians), batch 1/8/64; `--per-layer` times every leaf module on its own inputs at the largest batch, to show where the time goes. `--pooling auto` swaps each `nn.MaxPool2d`, in the dense model and every form alike, for an exact separable max-pool wherever it measures faster (PyTorch's CPU max-pool over NCHW tensors is slow: `benchmarks/structured_speedup.py` times LeNet-5 with native and separable pools side by side; from Python, `materialise(..., pooling=\"auto\")`). On the demo MLP:\n")
        output = run(exe + ["bench-latency", str(demo_out), "--forms", "auto,csr", "--per-layer"])
        parts.append(block("prunelab bench-latency runs/demo --forms auto,csr --per-layer", output.replace(str(demo_out), "runs/demo")))
        parts.append("### `prunelab oneshot`\n\nData-aware one-shot pruning of a pretrained transformer without retraining "
                     "(here the packaged all-MiniLM-L6-v2, calibrated on tinyshakespeare lines); the output folder loads "
                     "with `transformers.AutoModel.from_pretrained`. `--bias-correction` lets each pruned layer's "
                     "bias absorb its mean output change on the calibration data (`b += (W - W') E[x]`); the one-shot "
                     "tables below show where that helps (Wanda and magnitude on MiniLM) and where it does not "
                     "(magnitude and Wanda on the char-GPT; SparseGPT there gains a little). `--dense-targets` (SparseGPT, OBS, L-OBS) makes each layer reconstruct the "
                     "dense model's output from the pruned model's inputs, `min ||W X - W' X~||^2`; it is the "
                     "best row of the char-GPT and MiniLM tables (on LeNet-300-100 it helps only at 90%):\n")
        one_out = Path(tmp) / "minilm-wanda"
        one_args = ["oneshot", "--model", "minilm", "--method", "wanda", "--sparsity", "0.5", "--calib-samples", "64",
                    "--no-progress"]
        output = run(exe + one_args + ["--out", str(one_out)])
        parts.append(block("prunelab " + " ".join(one_args + ["--out", "runs/minilm-wanda"]),
                           output.replace(str(one_out), "runs/minilm-wanda")))
        parts.append("### `prunelab drop-layers`\n\nLayer pruning (Men et al. 2024, ShortGPT): score every transformer "
                     "block by its block influence on calibration text, remove the `--count` lowest; the shallower "
                     "model reloads with `from_pretrained` (see `benchmarks/layer_dropping.py` for what it costs):\n")
        drop_out = Path(tmp) / "minilm-4-layers"
        drop_args = ["drop-layers", "--model", "minilm", "--count", "2", "--no-progress"]
        output = run(exe + drop_args + ["--out", str(drop_out)])
        parts.append(block("prunelab " + " ".join(drop_args + ["--out", "runs/minilm-4-layers"]),
                           output.replace(str(drop_out), "runs/minilm-4-layers")))
        parts.append("### Bad input\n\nOne line on stderr, exit status 2, nothing written:\n")
        bad = exe + ["prune", "--granularity", "2:3", "--method", "oneshot", "--model", "digits_mlp", "--no-progress",
                     "--out", str(Path(tmp) / "bad")]
        output = run(bad, check=False)
        parts.append(block("prunelab prune --granularity 2:3 --method oneshot --model digits_mlp --no-progress; "
                           "echo \"exit $?\"",
                           output + f"\nexit {subprocess.run(bad, capture_output=True).returncode}"))
    return "\n".join(parts)


BENCH_GROUPS = (
    ("Benchmarks: pruning after training", ("han2015_lenet300",)),
    ("Make it faster: shrink, sparse kernels, Deep Compression",
     ("cpu_speedup", "structured_speedup", "deep_compression_lenet300", "gpu_semi_structured")),
    ("Prune a pretrained transformer (one-shot, data-aware)", ("llm_oneshot_tinygpt", "minilm_oneshot", "obs_lenet")),
    ("Train sparse from the start", ("snip_lenet300", "layer_collapse", "lottery_lenet300", "dst_mlp")),
    ("Beyond weight sparsity: attention heads, whole layers, low rank, sparse activations, sparse attention",
     ("head_pruning", "layer_dropping", "lowrank_minilm", "activation_sparsity", "sparse_attention")),
)


def record_section(path: Path) -> str:
    from prunelab.bench.records import rows_table, targets_table

    record = json.loads(path.read_text())
    env = record["environment"]
    parts = [f"### `benchmarks/{record['benchmark']}.py`\n",
             f"torch {env['torch']}, {env['threads']} thread{'' if env['threads'] == 1 else 's'}, {env['cpu']}, {env['date']}; "
             f"seeds {record['seeds']}"
             f"{' (quick run)' if record['config'].get('quick') else ''}.\n"]
    rows = record["rows"] + record.get("reference_rows", [])
    columns = [tuple(c) for c in record.get("columns", [])] or [(k, k) for k in rows[0]]
    parts.append(rows_table(rows, columns) + "\n")
    if record.get("layer_rows"):  # a per-layer table (e.g. Deep Compression's, like Han et al.'s Table 2)
        layer_rows = record["layer_rows"] + record.get("reference_layer_rows", [])
        layer_columns = [tuple(c) for c in record.get("layer_columns", [])] or [(k, k) for k in layer_rows[0]]
        parts.append(rows_table(layer_rows, layer_columns) + "\n")
    for table in record.get("extra_tables", []):  # further tables a record carries, each with its title
        parts.append(f"{table['title']}:\n\n" + rows_table(table["rows"], [tuple(c) for c in table["columns"]]) + "\n")
    if record.get("notes"):
        parts.append(str(record["notes"]) + "\n")
    parts.append(targets_table(record["targets"]) + "\n")
    for png in sorted(path.parent.glob(f"{record['benchmark']}*.png")):
        parts.append(f"![{png.stem}](benchmarks/results/{png.name})\n")
    return "\n".join(parts)


def bench_section() -> str:
    parts = ["## Benchmarks\n", "Each script in `benchmarks/` runs with no arguments on the offline data (`--quick` for a "
             "smoke run), prints a table and writes a JSON record to `benchmarks/results/`; every table below is "
             "rendered from those records by `scripts/update_readme.py`. Speed numbers are ratios measured side by "
             "side in one run.\n"]
    for title, names in BENCH_GROUPS:
        found = [RESULTS / f"{name}.json" for name in names if (RESULTS / f"{name}.json").is_file()]
        missing = [name for name in names if not (RESULTS / f"{name}.json").is_file()]
        parts.append(f"## {title}\n")
        parts.extend(record_section(path) for path in found)
        if missing:
            parts.append("Not run yet (no record): " + ", ".join(f"`benchmarks/{n}.py`" for n in missing) + ".\n")
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", action="store_true", help="only refresh the benchmark tables")
    args = parser.parse_args()
    text = README.read_text()
    if not args.bench:
        text = replace_section(text, "api", api_section())
        text = replace_section(text, "cli", cli_section())
    text = replace_section(text, "bench", bench_section())
    README.write_text(text)
    print(f"updated {README}")


if __name__ == "__main__":
    main()
