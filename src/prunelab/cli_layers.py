"""``prunelab drop-layers``: remove the least influential blocks of a transformer, written to a folder.

    prunelab drop-layers --model minilm --count 2 --out runs/minilm-4-layers
    prunelab drop-layers --model chargpt --count 1 --out runs/chargpt-3-layers

Scores every block by ShortGPT's block influence on Tiny Shakespeare calibration data
(:func:`prunelab.layers.block_influence`; the same ``--model`` names and calibration as
``prunelab oneshot``), prints the scores, removes the ``--count`` lowest
(:func:`prunelab.layers.drop_blocks`) and writes the shallower model atomically: it loads
with ``from_pretrained`` (transformers) or ``prunelab.bench.chargpt.load_chargpt``, next
to ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from prunelab.cli import int_arg
from prunelab.errors import PrunelabError
from prunelab.oneshot_cli import (
    DEFAULT_CALIB_SAMPLES, MODEL_FILES, add_model_args, calibration_for, check_seed, load_model, resolve_model,
    save_model,
)
from prunelab.out_folders import OutFiles, check_out_folder

__all__ = ["DROP_LAYERS_OUTPUT", "add_drop_layers_parser", "cmd_drop_layers"]

# what cmd_drop_layers writes: the shallower model (save_model) and its report
DROP_LAYERS_OUTPUT = OutFiles("drop-layers", (*MODEL_FILES, "report.json", "report.md"), record=("report.json", "dropped"))


def _markdown(record: dict[str, Any]) -> str:
    from prunelab.measure.tables import markdown_table

    rows = [{"block": name, "influence": score, "dropped": "yes" if name in record["dropped"] else ""}
            for name, score in record["block_influence"].items()]
    summary = record["summary"]
    return (f"# drop-layers: {record['model']}\n\n"
            f"{summary['blocks_before']} -> {summary['blocks_after']} blocks, parameters {summary['params_before']:,} -> "
            f"{summary['params_after']:,}; calibration: {record['calibration']['samples']} "
            f"{record['calibration']['unit']}.\n\n"
            + markdown_table(rows, [("block", "block"), ("influence", "block influence"), ("dropped", "dropped")]) + "\n")


def cmd_drop_layers(args: argparse.Namespace) -> int:
    """Score, drop ``--count`` blocks of ``--model`` and write ``--out`` (see the module docstring)."""
    from prunelab.io import atomic_dir, link_target, write_json, write_text

    if isinstance(args.count, bool) or args.count < 1:
        raise PrunelabError(f"--count must be a positive integer (blocks to drop), got {args.count}")
    if args.calib_samples is not None and args.calib_samples < 1:
        raise PrunelabError(f"--calib-samples must be a positive integer, got {args.calib_samples}")
    check_seed(args.seed)
    spec = resolve_model(args.model)
    from prunelab.pipeline import output_parent

    # checked writable before loading anything; the parents it made are removed again if the run fails
    with output_parent(link_target(args.out)):
        check_out_folder(args.out, DROP_LAYERS_OUTPUT, inputs=(spec.path,) if spec.path is not None else ())
        from prunelab.layers import block_influence, drop_blocks, lowest_influence

        model, tokenizer, meta = load_model(spec, args)
        from prunelab.oneshot.engine import find_blocks

        blocks = len(find_blocks(model))  # refuse an impossible --count before calibrating and scoring every block
        if blocks >= 2 and args.count >= blocks:
            raise PrunelabError(f"--count {args.count} would drop all {blocks} blocks of {args.model}; use at most {blocks - 1}")
        samples = args.calib_samples or DEFAULT_CALIB_SAMPLES[spec.kind]
        calibration, calib_info = calibration_for(spec, model, tokenizer, samples, args)
        started = time.perf_counter()
        scores = block_influence(model, calibration)
        if args.count >= len(scores):
            raise PrunelabError(f"--count {args.count} would drop all {len(scores)} blocks of {args.model}; "
                                f"use at most {len(scores) - 1}")
        dropped = lowest_influence(scores, args.count)
        params_before = sum(p.numel() for p in model.parameters())
        drop_blocks(model, dropped)
        record = {
            "model": args.model,
            "model_kind": spec.kind,
            "calibration": calib_info,
            "block_influence": scores,
            "dropped": dropped,
            "summary": {"blocks_before": len(scores), "blocks_after": len(scores) - len(dropped),
                        "params_before": params_before, "params_after": sum(p.numel() for p in model.parameters()),
                        "wall_time_s": time.perf_counter() - started},
            "source": {k: v for k, v in meta.items() if k in ("source", "folder", "sha256")},
        }
        for name, score in scores.items():
            print(f"{name:<24} block influence {score:.4f}{'  <- dropped' if name in dropped else ''}")
        check_out_folder(args.out, DROP_LAYERS_OUTPUT)  # again: another command may have written there meanwhile
        with atomic_dir(args.out) as tmp:
            save_model(spec, model, tokenizer, tmp, {"dropped_blocks": dropped}, args.progress)
            write_json(tmp / "report.json", record)
            write_text(tmp / "report.md", _markdown(record))
        summary = record["summary"]
        print(f"dropped {len(dropped)} of {summary['blocks_before']} blocks of {args.model}: parameters "
              f"{summary['params_before']:,} -> {summary['params_after']:,}; wrote {args.out}/")
        return 0


def add_drop_layers_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``drop-layers`` subcommand to ``subparsers``."""
    parser = subparsers.add_parser("drop-layers", help="remove the least influential transformer blocks (ShortGPT)",
                                   description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--count", type=int_arg, required=True, help="how many blocks to remove")
    parser.set_defaults(func=cmd_drop_layers)
    return parser
