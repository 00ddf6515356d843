"""``prunelab oneshot``: data-aware one-shot pruning of a transformer, written to a folder.

    prunelab oneshot --model minilm --method sparsegpt --pattern 2:4 --out runs/minilm-2of4
    prunelab oneshot --model chargpt --method wanda --sparsity 0.5 --out runs/chargpt-wanda
    prunelab oneshot --model path/to/hf-model --method magnitude --sparsity 0.6 --out runs/x

``--model`` is ``chargpt`` (the cached Tiny Shakespeare char-GPT, trained on first use),
``minilm`` (the packaged all-MiniLM-L6-v2) or a local folder holding a transformers model
(``config.json`` + safetensors + tokenizer files).  Calibration text is Tiny Shakespeare's
training split: random 64-character windows for the char-GPT (SparseGPT, Frantar &
Alistarh 2023, calibrate on random training segments) and random distinct lines,
tokenised, for transformers models.

The output folder is written atomically (:func:`prunelab.io.atomic_dir`): the pruned
model (``save_pretrained`` + tokenizer for transformers, ``model.safetensors`` +
``config.json`` for the char-GPT), ``masks.safetensors``, ``report.json`` and ``report.md``.
Every bad input is rejected before anything is loaded or written.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunelab.cli import float_arg, int_arg
from prunelab.errors import PrunelabError
from prunelab.measure.memory import peak_rss_mb
from prunelab.out_folders import OutFiles, check_out_folder

if TYPE_CHECKING:  # importing the CLI must stay cheap: torch is imported only when a command runs
    from torch import nn

__all__ = ["MODEL_FILES", "ONESHOT_OUTPUT", "ModelSpec", "add_oneshot_parser", "build_parser", "check_seed", "cmd_oneshot", "main",
           "parse_pattern", "resolve_model"]

KNOWN_MODELS = ("chargpt", "minilm")
DEFAULT_CALIB_SAMPLES = {"chargpt": 64, "transformers": 128}
PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
# what save_model writes: save_chargpt's two files, or save_pretrained's model and tokenizer files
# (transformers versions differ in which; sharded weights come as model-NNNNN-of-NNNNN.safetensors + index)
MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", "model-*-of-*.safetensors",
               "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "*.model", "chat_template.jinja",
               "chat_template.json")
ONESHOT_OUTPUT = OutFiles("oneshot", (*MODEL_FILES, "masks.safetensors", "report.json", "report.md"),
                          record=("report.json", "oneshot"))


@dataclass(frozen=True)
class ModelSpec:
    """What ``--model`` named: ``kind`` is ``chargpt`` or ``transformers``; ``path`` the folder for the latter."""

    name: str
    kind: str
    path: Path | None = None


def resolve_model(name: str) -> ModelSpec:
    """Map ``--model`` to a :class:`ModelSpec` without loading anything."""
    if name == "chargpt":
        return ModelSpec(name, "chargpt")
    if name == "minilm":
        from prunelab.bench.minilm import minilm_path

        return ModelSpec(name, "transformers", minilm_path())
    folder = Path(name).expanduser()
    if folder.is_dir() and (folder / "config.json").is_file():
        return ModelSpec(name, "transformers", folder)
    raise PrunelabError(
        f"{name!r} is neither a known model name ({', '.join(KNOWN_MODELS)}) nor a folder with a transformers "
        "config.json; pass --model chargpt, --model minilm or a folder written by save_pretrained"
    )


def parse_pattern(text: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; raises PrunelabError unless ``0 < n < m``."""
    match = PATTERN_RE.match(text)
    n, m = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    if not match or not 0 < n < m:
        raise PrunelabError(f"--pattern {text!r} is not an N:M pattern with 0 < N < M; use e.g. --pattern 2:4 or 4:8")
    return n, m


def check_seed(seed: int) -> None:
    """``--seed`` of ``oneshot`` / ``drop-layers``: the range every prunelab command takes (TrainConfig's)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise PrunelabError(f"--seed must be an integer in [0, 2**32), got {seed!r}; e.g. --seed 0")


def _validate_args(args: argparse.Namespace) -> tuple[float, str | None]:
    """Cheap checks of the flags; returns ``(sparsity, pattern)``."""
    check_seed(args.seed)
    if args.sparsity is not None and args.pattern is not None:
        raise PrunelabError(
            f"got both --sparsity {args.sparsity} and --pattern {args.pattern}; an N:M pattern fixes the sparsity, "
            "pass only one of them"
        )
    pattern = None
    sparsity = 0.5 if args.sparsity is None else args.sparsity
    if args.pattern is not None:
        n, m = parse_pattern(args.pattern)
        pattern, sparsity = f"{n}:{m}", 1.0 - n / m
    elif not 0.0 < sparsity < 1.0:
        raise PrunelabError(
            f"--sparsity {args.sparsity} is out of range; expected a fraction in (0, 1) such as 0.5 "
            "(or an N:M pattern via --pattern 2:4)"
        )
    if args.calib_samples is not None and args.calib_samples < 1:
        raise PrunelabError(
            f"--calib-samples {args.calib_samples} gives no calibration data; one-shot pruning needs at least one "
            "sample, use e.g. --calib-samples 128"
        )
    return sparsity, pattern



def _report_rows(report: Any) -> list[dict[str, Any]]:
    rows = report.to_dict().get("rows", [])
    flat = []
    for row in rows:
        flat.append({k: ("x".join(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in row.items()})
    return flat


def _render_markdown(record: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    from prunelab.measure.tables import markdown_table

    summary = record["summary"]
    config = record["config"]
    target = config["pattern"] or f"{config['sparsity']:.0%} unstructured"
    dense = ", ".join(record["oneshot"]["dense_layers"]) or "none"
    lines = [
        f"# One-shot pruning: {record['model']} with {config['method']} ({target})",
        "",
        (f"Calibration: {record['calibration']['samples']} {record['calibration']['unit']} from "
         f"{record['calibration']['source']}."),
        "",
        "## Summary",
        "",
        markdown_table([
            {"measure": "pruned layers", "value": summary["pruned_layers"]},
            {"measure": "sparsity of pruned layers (%)", "value": 100 * summary["pruned_layer_sparsity"]},
            {"measure": "sparsity of all parameters (%)", "value": 100 * summary["model_sparsity"]},
            {"measure": "parameters", "value": summary["params"]},
            {"measure": "nonzero parameters", "value": summary["nonzero_params"]},
            {"measure": "pruning wall time (s)", "value": summary["wall_time_s"]},
            {"measure": "peak RSS (MB)", "value": summary["peak_rss_mb"]},
        ], (("measure", "measure"), ("value", "value"))),
        "",
        f"Left dense (outside the pruned blocks, excluded, or never called): {dense}.",
        "",
        "## Layers",
        "",
    ]
    if rows:
        lines.append(markdown_table(rows, [(k, k) for k in rows[0]]))
    lines.append("")
    return "\n".join(lines)


def load_model(spec: ModelSpec, args: argparse.Namespace) -> tuple[nn.Module, Any, dict[str, Any]]:
    if spec.kind == "chargpt":
        from prunelab.bench.chargpt import load_or_train_chargpt

        model, meta = load_or_train_chargpt(args.data_dir, progress=args.progress)
        return model, None, meta
    from prunelab.bench.minilm import load_transformers_model

    model, tokenizer = load_transformers_model(spec.path, progress=args.progress)  # one-line errors for bad folders
    return model, tokenizer, {"source": os.fspath(spec.path)}


def calibration_for(spec: ModelSpec, model: nn.Module, tokenizer: Any, samples: int, args: argparse.Namespace
                    ) -> tuple[list[Any], dict[str, Any]]:
    """Tiny Shakespeare calibration inputs for the loaded model and a description of them:
    random ``block_size``-character windows for the char-GPT, tokenised distinct lines otherwise."""
    from prunelab.bench.text import calibration_lines, calibration_sequences, load_tinyshakespeare

    corpus = load_tinyshakespeare(args.data_dir)
    if spec.kind == "chargpt":
        calibration = calibration_sequences(corpus, samples, model.config.block_size, seed=args.seed)
        return calibration, {"samples": samples, "unit": f"random {model.config.block_size}-character windows",
                             "source": "the Tiny Shakespeare training split", "seed": args.seed}
    from prunelab.bench.minilm import tokenized_batches

    calibration = tokenized_batches(tokenizer, calibration_lines(corpus, samples, seed=args.seed))
    return calibration, {"samples": samples, "unit": "distinct lines", "source": "the Tiny Shakespeare training split",
                         "seed": args.seed}


def save_model(spec: ModelSpec, model: nn.Module, tokenizer: Any, folder: Path, note: dict[str, Any],
               progress: bool) -> None:
    """Write ``model`` (and its tokenizer) into ``folder`` the way it loads again: ``save_chargpt``
    with ``note`` in its metadata for the char-GPT, ``save_pretrained`` for transformers models."""
    if spec.kind == "chargpt":
        from prunelab.bench.chargpt import save_chargpt

        save_chargpt(model, folder, note)
        return
    from prunelab.bench.minilm import _progress_bars

    with _progress_bars(progress):
        model.save_pretrained(os.fspath(folder))
    tokenizer.save_pretrained(os.fspath(folder))


def cmd_oneshot(args: argparse.Namespace) -> int:
    """Prune ``--model`` one-shot with ``--method`` and write ``--out`` (see the module docstring)."""
    spec = resolve_model(args.model)
    sparsity, pattern = _validate_args(args)
    # before loading anything; another command's run there would be deleted by the swap
    check_out_folder(args.out, ONESHOT_OUTPUT, inputs=(spec.path,) if spec.path is not None else ())
    exclude = tuple(args.exclude or ())
    from prunelab.oneshot import OneShotConfig, prune_oneshot

    # validates method, dampening and block size; N:M divisibility and per-method size limits are
    # checked by prune_oneshot on the loaded model before any forward pass (and before writing)
    config = OneShotConfig(method=args.method, sparsity=sparsity, pattern=pattern, dampening=args.dampening,
                           block_size=args.block_size, exclude=exclude, bias_correction=args.bias_correction,
                           dense_targets=args.dense_targets)
    from prunelab.io import link_target
    from prunelab.pipeline import output_parent

    # the folder atomic_dir writes in: checked before loading anything, removed again if it was made and the run fails
    with output_parent(link_target(args.out)):
        samples = args.calib_samples or DEFAULT_CALIB_SAMPLES[spec.kind]
        model, tokenizer, meta = load_model(spec, args)
        calibration, calib_info = calibration_for(spec, model, tokenizer, samples, args)

        started = time.perf_counter()
        report = prune_oneshot(model, calibration, config, progress=args.progress)
        wall = time.perf_counter() - started
        masks = report.masks
        stats = masks.stats()
        params = sum(p.numel() for p in model.parameters())
        nonzero = sum(int((p != 0).sum()) for p in model.parameters())
        record = {
            "model": args.model,
            "model_kind": spec.kind,
            "config": dataclasses.asdict(config) | {"exclude": list(exclude)},
            "calibration": calib_info,
            "summary": {
                "pruned_layers": len(masks),
                "pruned_layer_sparsity": stats.sparsity,
                "model_sparsity": 1.0 - nonzero / params,
                "params": params,
                "nonzero_params": nonzero,
                "wall_time_s": getattr(report, "wall_time_s", wall),
                "peak_rss_mb": max(getattr(report, "peak_rss_mb", 0.0) or 0.0, peak_rss_mb()),
            },
            "oneshot": report.to_dict(),
            "source": {k: v for k, v in meta.items() if k in ("source", "folder", "sha256", "metrics")},
        }
        from prunelab.bench.records import benchmark_environment
        from prunelab.io import atomic_dir, write_json, write_text

        record["environment"] = benchmark_environment()
        rows = _report_rows(report)
        check_out_folder(args.out, ONESHOT_OUTPUT)  # again: another command may have written there while this ran
        with atomic_dir(args.out) as tmp:
            note = {"pruned": {"method": config.method, "sparsity": stats.sparsity, "pattern": pattern}}
            save_model(spec, model, tokenizer, tmp, note, args.progress)
            masks.save(tmp / "masks.safetensors")
            write_json(tmp / "report.json", record)
            write_text(tmp / "report.md", _render_markdown(record, rows))
        summary = record["summary"]
        print(f"pruned {summary['pruned_layers']} layers of {args.model} with {config.method} to "
              f"{100 * summary['pruned_layer_sparsity']:.2f}% sparsity in {summary['wall_time_s']:.1f} s "
              f"(peak RSS {summary['peak_rss_mb']:.0f} MB); wrote {args.out}/")
        return 0


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The flags ``oneshot`` and ``drop-layers`` share: which model, its calibration data, the output folder."""
    parser.add_argument("--model", required=True, metavar="PATH_OR_NAME",
                        help="chargpt, minilm, or a folder holding a transformers model (config.json + safetensors)")
    parser.add_argument("--calib-samples", type=int_arg, default=None, metavar="N",
                        help="calibration samples (default: 64 windows for chargpt, 128 lines for transformers)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (written atomically)")
    parser.add_argument("--data-dir", default=None, help="folder holding tinyshakespeare/input.txt "
                        "(default: $PRUNELAB_DATA or ../shared/data)")
    parser.add_argument("--seed", type=int_arg, default=0, help="seed of the calibration sample")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def add_oneshot_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``oneshot`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    parser = subparsers.add_parser(
        "oneshot", help="data-aware one-shot pruning (SparseGPT, Wanda, OBS, magnitude) of a transformer",
        description=__doc__.splitlines()[0],
    )
    add_model_args(parser)
    parser.add_argument("--method", default="sparsegpt",
                        help="sparsegpt | wanda | magnitude | magnitude-row | obs | lobs (default sparsegpt)")
    parser.add_argument("--sparsity", type=float_arg, default=None, help="unstructured sparsity in (0, 1) (default 0.5)")
    parser.add_argument("--pattern", default=None, metavar="N:M", help="semi-structured N:M sparsity, e.g. 2:4")
    parser.add_argument("--dampening", type=float_arg, default=0.01, help="Hessian dampening, fraction of mean diagonal")
    parser.add_argument("--block-size", type=int_arg, default=128, help="SparseGPT column block size")
    parser.add_argument("--exclude", action="append", default=None, metavar="GLOB",
                        help="module-name glob left dense (repeatable)")
    parser.add_argument("--bias-correction", action="store_true",
                        help="let each pruned layer's bias absorb its mean output change, b += (W - W') E[x]")
    parser.add_argument("--dense-targets", action="store_true",
                        help="reconstruct the dense model's layer outputs from the pruned model's inputs "
                             "(GPTAQ's asymmetric calibration; sparsegpt/obs/lobs)")
    parser.set_defaults(func=cmd_oneshot)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """A parser with only the ``oneshot`` subcommand (``python -m prunelab.oneshot_cli oneshot ...``)."""
    from prunelab.cli import ArgumentParser

    parser = ArgumentParser(prog="prunelab")
    add_oneshot_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Same contract as ``prunelab.cli.main``: a PrunelabError is one ``error:`` line and exit 2."""
    from prunelab.cli import parse_or_status, run_command

    args = parse_or_status(build_parser(), argv)
    return args if isinstance(args, int) else run_command(args)


if __name__ == "__main__":
    sys.exit(main())
