"""``prunelab materialise`` and ``prunelab bench-latency``: make a pruned checkpoint really faster.

``materialise CHECKPOINT --form shrink|csr|bsr|2:4|auto --out DIR`` writes a model that
``prunelab.load(DIR)`` rebuilds; it is proven equal to the masked model on real test
inputs first.  ``bench-latency CHECKPOINT`` times dense vs materialised side by side at
batch sizes 1/8/64 and prints the ratios with the thread count; ``--per-layer`` adds each
leaf module's time at the largest batch size (where the time goes); ``--pooling auto``
gives the dense model and every form the exact separable max-pool where it measures faster.
"""

from __future__ import annotations

import argparse
import copy
import warnings
from pathlib import Path
from typing import Any

import torch

from prunelab.checkpoint import MODEL_FILE
from prunelab.cli import int_arg
from prunelab.errors import PrunelabError
from prunelab.loading import MATERIALISED_META, MATERIALISED_STATE
from prunelab.out_folders import OutFiles, check_out_folder

# what materialise writes: write_shrunk's model + architecture (--form shrink), or the sparse-format model;
# any of these folders is replaced by a re-run of any form
MATERIALISE_OUTPUT = OutFiles("materialise", (MODEL_FILE, "architecture.json", MATERIALISED_STATE, MATERIALISED_META))


def add_materialise_parsers(subparsers: Any) -> None:
    mat = subparsers.add_parser("materialise", help="turn a pruned checkpoint into a smaller/faster model (shrink, csr, bsr, 2:4, auto)")
    mat.add_argument("checkpoint", help="checkpoint folder written by prune/demo")
    mat.add_argument("--form", default="auto", help="shrink | csr | bsr | 2:4 | auto (default: auto, measured per layer)")
    mat.add_argument("--out", required=True, help="output folder (prunelab.load rebuilds the model from it)")
    add_silence_option(mat, "--form shrink")  # the same option as bench-latency's
    mat.add_argument("--data-dir", default=None,
                     help="MNIST folder for the check inputs (default: $PRUNELAB_DATA, else ~/.cache/prunelab/mnist)")
    mat.set_defaults(func=cmd_materialise)

    lat = subparsers.add_parser("bench-latency", help="latency of dense vs materialised forms at batch 1/8/64")
    lat.add_argument("checkpoint", help="checkpoint folder written by prune/demo")
    lat.add_argument("--forms", default="auto", help="comma-separated forms to time against dense (default: auto)")
    lat.add_argument("--batch-sizes", default="1,8,64", help="comma-separated batch sizes (default 1,8,64)")
    lat.add_argument("--reps", type=int_arg, default=15, help="interleaved repetitions per measurement (median reported)")
    lat.add_argument("--threads", type=int_arg, default=None,
                     help="intra-op threads for the whole run, auto's kernel choice included (default: torch's, "
                          "usually one per core); the table states the number used")
    lat.add_argument("--per-layer", action="store_true",
                     help="also time every leaf module on its own inputs at the largest batch size")
    lat.add_argument("--keep-denormals", action="store_true",
                     help="time without flushing subnormal floats to zero (flushed by default, as for CPU inference)")
    add_silence_option(lat, "--forms including shrink", "the dense model and every form are timed on the silenced "
                                                        "model; ")
    lat.add_argument("--pooling", default="native", choices=("native", "auto"),
                     help="auto: time every nn.MaxPool2d and use the exact separable pool where faster, in the "
                          "dense model and every form alike (default: native)")
    lat.add_argument("--data-dir", default=None,
                     help="MNIST folder for the timing inputs (default: $PRUNELAB_DATA, else ~/.cache/prunelab/mnist)")
    lat.set_defaults(func=cmd_bench_latency)


def add_silence_option(parser: argparse.ArgumentParser, forms: str, extra: str = "") -> None:
    """``--silence-pruned-channels`` of ``materialise`` and ``bench-latency`` (``forms``: the forms it applies to)."""
    parser.add_argument("--silence-pruned-channels", action="store_true",
                        help=f"with {forms}: first zero the bias / BatchNorm shift of every pruned channel, which "
                             "otherwise carries a constant act(bias) that a zero-padded conv still reads (shrink then "
                             f"refuses); {extra}this changes the model, so the test accuracy before and after is printed")


def check_silence_forms(silence: bool, forms: list[str], option: str, applies: str) -> None:
    """``--silence-pruned-channels`` only helps shrink: refuse it for a run that shrinks nothing."""
    if silence and "shrink" not in forms:
        raise PrunelabError(f"--silence-pruned-channels applies to {applies} (got {option} {','.join(forms)}); the "
                            "sparse forms keep every channel -- drop the flag")


def resolve_checkpoint(path: str) -> Path:
    """The checkpoint folder ``path`` names (itself, or the folder of its checkpoint.json); absent or a file
    that is no checkpoint file: the one-line PrunelabError that loading gives."""
    from prunelab.checkpoint import _resolve

    return _resolve(path)


def check_out_parent(out: str) -> None:
    """Refuse an --out whose missing parents cannot be created or whose nearest existing folder is not
    writable; creates nothing (atomic_dir / atomic_path create the parents when the output is written)."""
    from prunelab.io import ensure_writable_dir

    parent = Path(out).parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PrunelabError(f"cannot create output directory {str(parent)!r}: {str(existing)!r} is a file; "
                            "choose a writable --out")
    ensure_writable_dir(existing)  # it exists: only probed by writing a temporary file


def _checkpoint_and_inputs(path: str, data_dir: str | None, count: int = 64):
    from prunelab.bench.datasets import load_dataset
    from prunelab.checkpoint import checkpoint_dataset, load_checkpoint

    ckpt = load_checkpoint(path)
    ckpt.masks.apply_(ckpt.model)
    ckpt.model.eval()
    splits = load_dataset(checkpoint_dataset(ckpt.meta, path, data_dir), data_dir)
    inputs = torch.stack([splits.test[i][0] for i in range(min(count, len(splits.test)))])  # (B, *input_shape)
    return ckpt, inputs


def _materialise(ckpt, inputs: torch.Tensor, form: str, pooling: str = "native",
                 command: str = "materialise") -> torch.nn.Module:
    """``materialise`` the checkpoint's model; a refusal names ``command``'s own --silence-pruned-channels."""
    from prunelab.materialise import materialise
    from prunelab.materialise.shrink_plan import SILENCE_CLI

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            new = materialise(ckpt.model, form, masks=ckpt.masks, example_input=inputs, batch_sizes=(1, 64),
                              pooling=pooling)
        except PrunelabError as exc:
            if command == "materialise" or SILENCE_CLI not in str(exc):
                raise
            raise PrunelabError(str(exc).replace(SILENCE_CLI, f"{command} --silence-pruned-channels")) from None
    for warning in caught:
        print(f"note: {warning.message}")
    return new


def _silence(ckpt, inputs: torch.Tensor, path: str, data_dir: str | None) -> None:
    """``silence_pruned_channels_`` on the checkpoint's model, printing the test accuracy before and after."""
    from prunelab.bench.datasets import load_dataset, make_loaders
    from prunelab.bench.training import evaluate
    from prunelab.checkpoint import checkpoint_dataset
    from prunelab.materialise.shrink import silence_pruned_channels_

    splits = load_dataset(checkpoint_dataset(ckpt.meta, path, data_dir), data_dir)
    _, test_loader = make_loaders(splits, 128, seed=0)
    before = evaluate(ckpt.model, test_loader)["accuracy"]
    silence_pruned_channels_(ckpt.model, ckpt.masks, inputs)
    after = evaluate(ckpt.model, test_loader)["accuracy"]
    print(f"silenced the pruned channels' constant outputs: test accuracy {100 * before:.2f}% -> {100 * after:.2f}% "
          "(the shrunk model is checked against the silenced one)")


def cmd_materialise(args: argparse.Namespace) -> int:
    from prunelab.io import atomic_dir, write_json
    from prunelab.materialise import FORMS
    from prunelab.materialise.spec import write_shrunk
    from prunelab.measure.counting import measure_model
    from prunelab.measure.tables import markdown_table

    FORMS.get(args.form)  # unknown form: one line listing the valid ones, before any work
    check_silence_forms(args.silence_pruned_channels, [args.form], "--form", "--form shrink only")
    # a CHECKPOINT that is a file (not checkpoint.json) or absent: its own message first -- the --out check
    # below took a file's folder for the input and said "--out is inside the input" for --out beside it
    # another command's run there (a prune run, a lottery run) would be deleted: refused before any work
    check_out_folder(args.out, MATERIALISE_OUTPUT)
    checkpoint = resolve_checkpoint(args.checkpoint)
    check_out_folder(args.out, MATERIALISE_OUTPUT, inputs=(checkpoint,))  # and not into (or over) the checkpoint
    # probe the nearest existing folder above --out, creating nothing: creating --out (or its missing
    # parents) up front left empty folders behind whenever loading or materialising failed; atomic_dir
    # creates them on success
    check_out_parent(args.out)
    ckpt, inputs = _checkpoint_and_inputs(args.checkpoint, args.data_dir)
    if args.silence_pruned_channels:
        _silence(ckpt, inputs, args.checkpoint, args.data_dir)
    new = _materialise(ckpt, inputs, args.form)
    report = new.materialise_report
    meta = {k: ckpt.meta[k] for k in ("model", "dataset", "input_shape", "num_classes")}
    check_out_folder(args.out, MATERIALISE_OUTPUT)  # again: another command may have written there meanwhile
    # every form replaces the whole folder the same way, so any earlier materialise output (shrunk or
    # sparse-format) gives way to the new one; the folder checks above are the only ones
    with atomic_dir(args.out) as tmp:
        if args.form == "shrink":
            write_shrunk(tmp, new, list(inputs.shape[1:]), meta)
        else:
            torch.save(new.state_dict(), tmp / MATERIALISED_STATE)
            write_json(tmp / MATERIALISED_META, {**meta, "form": args.form, "max_abs_error": report.max_abs_error,
                                                  "layers": report.rows()})
    if args.form == "shrink":
        dense_cost, new_cost = measure_model(ckpt.model, inputs[:1]), measure_model(new, inputs[:1])
        print(f"shrunk: {dense_cost.params:,} -> {new_cost.params:,} parameters, "
              f"{dense_cost.dense_flops:,} -> {new_cost.dense_flops:,} FLOPs per sample")
    if report.rows():  # shrink has no per-layer sparse forms (an empty table was an error after the write)
        print(markdown_table(report.rows(), None))
    print(f"max abs error vs the masked model on {inputs.shape[0]} test inputs: {report.max_abs_error:.3g} "
          f"(output scale {report.output_scale:.3g}); written to {args.out}/ -- load with prunelab.load({args.out!r})")
    return 0


MAX_BATCH_SIZE = 2**31 - 1  # int32: beyond it torch's storage-size arithmetic can overflow (a RuntimeError)


def _batch(inputs: torch.Tensor, size: int) -> torch.Tensor:
    reps = -(-size // inputs.shape[0])
    return inputs.repeat(reps, *([1] * (inputs.dim() - 1)))[:size]


def cmd_bench_latency(args: argparse.Namespace) -> int:
    from prunelab.materialise import FORMS

    forms = list(dict.fromkeys(f.strip() for f in args.forms.split(",") if f.strip()))  # each form once
    if not forms:  # nothing to time against dense: the run would print a table with no comparison
        raise PrunelabError(f"--forms names no form, got {args.forms!r}; pass e.g. --forms csr,bsr or leave it out "
                            "(auto)")
    for form in forms:
        FORMS.get(form)
    try:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        raise PrunelabError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    if not sizes or min(sizes) < 1 or args.reps < 1:
        raise PrunelabError(f"--batch-sizes and --reps must be positive, got {args.batch_sizes!r} and {args.reps}")
    if max(sizes) > MAX_BATCH_SIZE:  # torch's size arithmetic overflowed on 99999999999999999999: a traceback
        raise PrunelabError(f"--batch-sizes: {max(sizes)} is too large (at most {MAX_BATCH_SIZE:,}); e.g. 1,8,64")
    if args.threads is not None and args.threads < 1:
        raise PrunelabError(f"--threads must be a positive integer, got {args.threads}; e.g. --threads 1")
    silence = getattr(args, "silence_pruned_channels", False)
    check_silence_forms(silence, forms, "--forms", "--forms that include shrink only")
    ckpt, inputs = _checkpoint_and_inputs(args.checkpoint, args.data_dir)
    if silence:  # every form and the dense baseline: one model, so the ratios compare like with like
        _silence(ckpt, inputs, args.checkpoint, args.data_dir)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    flushed = not args.keep_denormals and torch.set_flush_denormal(True)  # False where the CPU cannot
    try:
        dense = ckpt.model
        if args.pooling == "auto":  # the dense baseline gets the same pools, so the ratios credit only the form
            from prunelab.materialise.pooling import speed_up_pooling_

            dense = copy.deepcopy(ckpt.model).eval()
            pools = speed_up_pooling_(dense, {1: _batch(inputs, 1), 64: _batch(inputs, 64)})
            print(f"max pools, dense model (pooling auto; every form chose its own the same way):\n{pools.table()}\n")
        models = {"dense": dense, **{form: _materialise(ckpt, inputs, form, args.pooling, "bench-latency")
                                     for form in forms}}
        _report_latency(models, inputs, sizes, forms, args.reps, args.per_layer, flushed)
    finally:
        if flushed:
            torch.set_flush_denormal(False)  # torch's default: leave the process as it was found
        torch.set_num_threads(threads)
    return 0


def _report_latency(models: dict[str, torch.nn.Module], inputs: torch.Tensor, sizes: list[int], forms: list[str],
                    reps: int, per_layer: bool, flushed: bool) -> None:
    """Print the dense-vs-forms latency table (and the per-leaf table with ``per_layer``)."""
    from prunelab.measure.latency import layer_latency_ms, model_latency_ms
    from prunelab.measure.tables import markdown_table

    rows = []
    for size in sizes:
        times = model_latency_ms(models, _batch(inputs, size), reps=reps)
        row: dict[str, Any] = {"batch": size, "dense_ms": times["dense"]}
        for form in forms:
            row[f"{form}_ms"] = times[form]
            row[f"{form}_speedup_x"] = times["dense"] / times[form]
        rows.append(row)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__.split('+')[0]}, {threads} thread{'' if threads == 1 else 's'}; "
          f"median of {reps} interleaved repetitions; dense = the masked model with zeros; "
          f"subnormal floats {'flushed to zero' if flushed else 'kept'}")
    print(markdown_table(rows, None))
    if not per_layer:
        return
    size = max(sizes)
    layers = layer_latency_ms(models, _batch(inputs, size), reps=reps)
    total = sum(times["dense"] for times in layers.values() if "dense" in times)
    table = []
    for name, times in layers.items():
        row = {"layer": name, "dense_ms": times.get("dense"),
               "dense_share_pct": 100 * times["dense"] / total if "dense" in times and total > 0 else None}
        row.update({f"{form}_ms": times.get(form) for form in forms})
        table.append(row)
    print(f"\nper leaf module at batch {size} (each on its own inputs; share of the leaves' dense total):")
    print(markdown_table(table, None))
