"""``prunelab compress CHECKPOINT --out FILE``: Deep Compression of a pruned checkpoint.

Quantises every pruned layer by k-means weight sharing (optionally fine-tunes the
centroids), writes one Huffman-coded file, reads it back and evaluates the decoded model
on the checkpoint's test set, so the size and error printed are those of the file.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

from prunelab.cli import float_arg, int_arg
from prunelab.errors import PrunelabError


def _parse_bits(flag: str, text: str | None) -> int | dict[str, int] | None:
    """``flag``'s value: ``5`` or ``fc=5,conv=8`` or ``fc1.weight=6,...`` (None: the defaults).

    Malformed text and a name given twice (which value would win?) are one-line PrunelabErrors.
    """
    if text is None:
        return None
    try:
        if "=" not in text:
            return int(text)
        pairs = [(k.strip(), int(v)) for k, v in (part.split("=", 1) for part in text.split(",") if part.strip())]
    except ValueError:
        raise PrunelabError(f"{flag} expects BITS or NAME=BITS[,NAME=BITS...], got {text!r}; e.g. {flag} "
                            "fc=5,conv=8") from None
    bits: dict[str, int] = {}
    for name, value in pairs:
        if name in bits:
            raise PrunelabError(f"{flag} gives {name!r} twice ({name}={bits[name]} and {name}={value}) in {text!r}; "
                                "give each name once")
        bits[name] = value
    return bits


def _check_replaceable_file(out: str) -> None:
    """Refuse an existing --out file that ``prunelab compress`` did not write: it was silently overwritten (a
    user's file, another checkpoint's model.safetensors). An earlier compressed file (it starts with MAGIC) may go."""
    from prunelab.compress import MAGIC

    path = Path(out)
    if not path.is_file():
        return
    try:
        with path.open("rb") as handle:
            head = handle.read(len(MAGIC))
    except OSError as exc:
        raise PrunelabError(f"cannot read the existing --out {out!r} ({exc.strerror}); choose a new file") from None
    if head != MAGIC:
        raise PrunelabError(f"refusing to overwrite {out!r}: it is not a file written by prunelab compress; choose a "
                            "new file for --out (or remove it)")


def add_compress_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("compress", help="Deep Compression (Han et al. 2016): quantise + Huffman-code a checkpoint")
    parser.add_argument("checkpoint", help="checkpoint folder written by prune/demo")
    parser.add_argument("--out", required=True, help="compressed file to write (e.g. model.plc)")
    parser.add_argument("--bits", default=None, help="weight bits: N, or fc=5,conv=8 (default 5 fc / 8 conv)")
    parser.add_argument("--index-bits", default=None, help="relative-index bits (default 5 fc / 8 conv)")
    parser.add_argument("--finetune-epochs", type=int_arg, default=0, help="epochs of centroid fine-tuning (needs the dataset)")
    parser.add_argument("--finetune-lr", type=float_arg, default=0.01, help="centroid fine-tuning learning rate (default 0.01)")
    parser.add_argument("--data-dir", default=None,
                        help="MNIST folder for evaluation (default: $PRUNELAB_DATA, else ~/.cache/prunelab/mnist)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="progress bar while fine-tuning the centroids (default: on)")
    parser.set_defaults(func=cmd_compress)


def cmd_compress(args: argparse.Namespace) -> int:
    from prunelab.bench.datasets import load_dataset, make_loaders
    from prunelab.bench.models import build_model
    from prunelab.bench.training import evaluate
    from prunelab.checkpoint import load_checkpoint
    from prunelab.compress import REPORT_COLUMNS, finetune_centroids, quantize_model, read_compressed, write_compressed
    from prunelab.measure.energy import estimate_energy
    from prunelab.measure.tables import markdown_table

    if args.finetune_epochs < 0:
        raise PrunelabError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    if not (math.isfinite(args.finetune_lr) and args.finetune_lr > 0):  # as prune's --finetune-lr
        raise PrunelabError(f"--finetune-lr must be a positive number, got {args.finetune_lr!r}; e.g. 0.01")
    bits, index_bits = _parse_bits("--bits", args.bits), _parse_bits("--index-bits", args.index_bits)
    from prunelab.checkpoint import checkpoint_dataset
    from prunelab.io import check_output_file

    from prunelab.cli_materialise import check_out_parent, resolve_checkpoint

    # a CHECKPOINT that is a file (not checkpoint.json) or absent: its own message first -- the check below took
    # a file's folder for the input and said "--out is inside the checkpoint" for an --out beside it
    check_output_file(args.out)  # empty, or a folder
    if args.out.endswith(("/", os.sep)):  # Path() drops the slash: 'new/' was written as a FILE called new
        raise PrunelabError(f"--out must name a file to write, got {args.out!r} (a folder); e.g. --out "
                            f"{args.out}model.plc")
    checkpoint = resolve_checkpoint(args.checkpoint)
    # anywhere in the checkpoint folder (CKPT/model.safetensors, CKPT/results.json, ...): refused, before any work
    check_output_file(args.out, inputs=(checkpoint,), what="the checkpoint")
    _check_replaceable_file(args.out)
    check_out_parent(args.out)
    ckpt = load_checkpoint(args.checkpoint)
    meta = ckpt.meta
    splits = load_dataset(checkpoint_dataset(meta, args.checkpoint, args.data_dir), args.data_dir)
    train_loader, test_loader = make_loaders(splits, 128, seed=0)
    before = evaluate(ckpt.model, test_loader)
    codebooks = quantize_model(ckpt.model, ckpt.masks, bits=bits)
    if args.finetune_epochs:
        finetune_centroids(ckpt.model, codebooks, train_loader, args.finetune_epochs, args.finetune_lr, progress=args.progress,
                           lr_flag="--finetune-lr")
    report = write_compressed(args.out, ckpt.model, ckpt.masks, bits=bits, index_bits=index_bits)
    decoded = build_model(meta["model"], tuple(meta["input_shape"]), int(meta["num_classes"]))
    decoded.load_state_dict(read_compressed(args.out))
    after = evaluate(decoded, test_loader)
    example = splits.test[0][0].unsqueeze(0)
    energy = estimate_energy(decoded, example, ckpt.masks, compressed=report)

    print(markdown_table(report.to_rows(), REPORT_COLUMNS))
    print()
    print(f"{args.out}: {report.total_bytes:,} bytes, {report.compression_x:.1f}x smaller than dense fp32; "
          f"test error {before['error_pct']:.2f}% pruned -> {after['error_pct']:.2f}% decoded from the file")
    print()
    print(markdown_table(energy.summary_rows(), (
        ("form", "form"), ("macs", "MACs"), ("weight_bytes", "weight bytes"), ("energy_nj", "energy nJ / inference"),
        ("energy_saving_x", "saving x"))))
    print(energy.assumptions)
    return 0
