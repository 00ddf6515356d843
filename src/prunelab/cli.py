"""The ``prunelab`` command line: demo, prune, list, inspect.

Every user mistake surfaces as one ``error: ...`` line on stderr and exit status 2;
``prune``'s flags are generated from :class:`prunelab.config.RunConfig`, so the CLI and
``--config run.yaml`` accept exactly the same keys.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from prunelab.config import beyond_torch
from prunelab.errors import PrunelabError

DEMO_DEFAULTS = dict(
    model="digits_mlp", dataset="digits", method="iterative", criterion="magnitude", allocation="global",
    sparsity=0.9, rounds=5, pretrain_epochs=30, finetune_epochs=8, lr=0.05, batch_size=64,
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with prunelab's error contract: a usage mistake is one ``error:`` line and exit status 2.

    Plain argparse prints the whole usage block (18 lines for ``prune``) before its message;
    subparsers made by :meth:`add_subparsers` inherit this class, so every command shares it.
    """

    def error(self, message: str) -> typing.NoReturn:
        message = " ".join(message.split())  # argparse's own messages are one line; make sure
        if message.startswith("argument ") and "expected one argument" in message:
            # "--sparsity -inf" / "--granularity -2:4": argparse takes a value starting with '-' for a flag
            message += " (a value starting with '-' must be attached: --flag=VALUE)"
        self.exit(2, f"error: {self.prog}: {message}; see '{self.prog} --help'\n")


def _torch_sized(parse, expected: str):
    """An argparse ``type`` that parses with ``parse`` and refuses values torch cannot hold
    (:func:`prunelab.config.beyond_torch`); nan / inf pass (the option's own check names its range)."""
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        reason = beyond_torch(value)
        if reason:
            raise argparse.ArgumentTypeError(f"{text} is too large ({reason}); pass a realistic value")
        return value

    convert.__name__ = parse.__name__
    return convert


int_arg = _torch_sized(int, "an integer")  # integer flags: within int64
float_arg = _torch_sized(float, "a number")  # float flags: finite values within float32


def _parse_rates(text: str) -> dict[str, float]:
    rates = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            rates[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise argparse.ArgumentTypeError(f"expected NAME=RATE[,NAME=RATE...], got {text!r}")
    return rates


def _scalar_type(annotation: Any) -> Any:
    hint = annotation if not isinstance(annotation, str) else eval(annotation, vars(typing) | {"types": types})  # noqa: S307 -- our own dataclass annotations
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args and typing.get_origin(hint) in (typing.Union, types.UnionType) else hint


def _help_text(name: str, text: str) -> str:
    """``text`` with RunConfig's default for field ``name`` appended, unless it names its default already
    (the flags' argparse defaults are None, so that ``--config`` values survive: ``%(default)s`` would say None)."""
    from prunelab.config import field_default

    default = field_default(name)
    if "default" not in text and default not in (None, (), {}):
        shown = ("on" if default else "off") if isinstance(default, bool) else default
        text = f"{text} (default: {shown})"
    return text.replace("%", "%%")  # argparse formats help with %


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field; defaults are None so YAML values survive."""
    from prunelab.config import RunConfig

    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _scalar_type(f.type)
        help_text = _help_text(f.name, f.metadata.get("help", ""))
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name == "layer_rates":
            parser.add_argument(flag, dest=f.name, type=_parse_rates, default=None, metavar="NAME=RATE,...", help=help_text)
        elif f.name == "exclude":
            parser.add_argument(flag, dest=f.name, action="append", default=None, metavar="GLOB", help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type={int: int_arg, float: float_arg}.get(kind, str), default=None,
                                help=help_text)


def _config_from_args(args: argparse.Namespace, defaults: dict[str, Any] | None = None):
    """``(RunConfig, names the user gave)``: every flag on the command line, and each ``--config`` key
    whose value is not RunConfig's default (a YAML file may repeat every default, e.g. a results.json
    ``config``); ``defaults`` count as not given."""
    from prunelab.config import FIELD_NAMES, config_from_mapping, load_yaml_config, non_default_fields

    values: dict[str, Any] = dict(defaults or {})
    from_file: dict[str, Any] = load_yaml_config(args.config) if getattr(args, "config", None) else {}
    values.update(from_file)
    flags = {k: getattr(args, k) for k in FIELD_NAMES if getattr(args, k, None) is not None}
    values.update(flags)
    config = config_from_mapping(values, source="--config / flags")  # an unset sparsity: RunConfig resolves it
    _check_magnitudes(config)
    return config, frozenset(flags) | (frozenset(from_file) & non_default_fields(config))


def _check_magnitudes(config) -> None:
    """Refuse numbers torch cannot hold (flags are checked as they are parsed; this also covers ``--config``)."""
    for name, value in config.to_dict().items():
        reason = beyond_torch(value)
        if reason:
            flag = "--" + name.replace("_", "-")
            raise PrunelabError(f"{flag} / {name} {value!r} is too large for torch ({reason}); pass a realistic value")


def _print_run(record: dict[str, Any], out: str) -> None:
    from prunelab.measure.tables import markdown_table
    from prunelab.report import STAGE_COLUMNS, SUMMARY_COLUMNS, summary_rows

    print()
    print(markdown_table(record["stages"], STAGE_COLUMNS))
    print()
    print(markdown_table(summary_rows(record), SUMMARY_COLUMNS))
    print()
    config = record["config"]
    scope = (" over the masked weights (--exclude'd layers do not count; the table above counts every weight)"
             if config.get("exclude") else "")
    kept = [f"--keep-{end}" for end in ("first", "last") if config.get(f"keep_{end}") is not None]
    if ":" in str(config.get("granularity", "")) and kept and record["achieved_sparsity"] < record["target_sparsity"]:
        scope += (f" (layers kept dense by {' / '.join(kept)} count at 0%; every other layer is exactly 1 - N/M "
                  "sparse)")
    print(f"target sparsity {record['target_sparsity']:.4f}, achieved {record['achieved_sparsity']:.4f}{scope}; "
          f"wall time {record['wall_time_s']:.1f} s")
    print(f"results: {out}/results.json, {out}/report.md, {out}/sparsity_curve.png; checkpoint: {out}/")
    lopsided = _lopsided_global_note(record)
    if lopsided:
        print(lopsided, file=sys.stderr)


def _lopsided_global_note(record: dict[str, Any]) -> str | None:
    """A warning when a global threshold over group norms all but removed one layer while another kept most.

    A channel / neuron score is a norm over the group (Li et al. 2017's L1), which grows with
    the fan-in: one threshold across layers then favours the wide ones (Lee et al. 2021, LAMP).
    """
    config = record["config"]
    if config.get("allocation") != "global" or config.get("granularity") not in ("vector", "kernel", "channel",
                                                                                  "neuron"):
        return None
    from prunelab.config import RunConfig
    from prunelab.pipeline import keep_last_for

    layers = [layer for layer in record.get("layers", []) if layer["total"]]
    kept_last = keep_last_for(RunConfig(granularity=config["granularity"], keep_last=config.get("keep_last")))
    bound = {end: str(rule).lower() != "none" for end, rule in (("first", config.get("keep_first")),
                                                                ("last", kept_last)) if rule is not None}
    layers = layers[int(bound.get("first", False)):len(layers) - int(bound.get("last", False))]  # the rules' own
    if len(layers) < 2:
        return None
    thinnest = max(layers, key=lambda layer: layer["sparsity"])
    fullest = min(layers, key=lambda layer: layer["sparsity"])
    if thinnest["sparsity"] < 0.95 or fullest["sparsity"] > 0.5 * record["target_sparsity"]:
        return None
    return (f"warning: the global threshold left {thinnest['name']} {thinnest['sparsity']:.1%} sparse while "
            f"{fullest['name']} is {fullest['sparsity']:.1%}: {config['granularity']} scores are norms over the "
            "group, which grow with the fan-in, so one threshold favours wide layers; --allocation uniform or lamp "
            "keeps every layer in play")


def cmd_prune(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> int:
    from prunelab import distributed, pipeline

    config, given = _config_from_args(args, defaults)
    distributed.init_from_env()  # under torchrun: DDP training, masks from scores reduced across ranks
    failed = True  # until the run and its printout are done: then every rank meets at shutdown's barrier
    try:
        record = pipeline.run(config, given=given)
        if distributed.is_main_process():
            _print_run(record, str(config.out_dir()))
        failed = False
    finally:
        # explicit, not inferred from sys.exc_info(): that also sees an exception a caller is
        # handling around this call, and a successful rank would then skip the barrier
        distributed.shutdown(failed=failed)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from prunelab import pipeline
    from prunelab.config import config_from_mapping
    from prunelab.out_folders import check_out_folder

    defaults = dict(DEMO_DEFAULTS, out="runs/demo" if args.out is None else args.out, seed=args.seed, progress=args.progress)
    config = config_from_mapping(defaults, source="demo")
    # the checks prune makes before its first output line, so that a refused demo prints nothing on stdout
    pipeline.validate(config)
    out = config.out_dir()
    check_out_folder(out, pipeline.PRUNE_OUTPUT)  # creates nothing
    with pipeline.output_parent(out):  # checked writable; removed again if the run fails
        print("prunelab demo: train an MLP on scikit-learn's 8x8 digits, then prune it to 90% sparsity "
              "in 5 rounds of magnitude pruning + retraining")
        record = pipeline.run(config)
    _print_run(record, str(out))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from prunelab.allocation import ALLOCATIONS
    from prunelab.bench.datasets import DATASETS
    from prunelab.bench.models import MODELS
    from prunelab.criteria import CRITERIA
    from prunelab.materialise import FORMS
    from prunelab.methods import METHODS
    from prunelab.oneshot import SOLVERS
    from prunelab.schedules import SCHEDULES
    from prunelab.structure import GRANULARITIES

    for title, registry in (("criteria", CRITERIA), ("granularities", GRANULARITIES), ("allocations", ALLOCATIONS),
                            ("methods (prunelab prune --method)", METHODS), ("schedules", SCHEDULES),
                            ("one-shot methods (prunelab oneshot --method)", SOLVERS),
                            ("materialised forms (prunelab materialise --form)", FORMS),
                            ("models", MODELS), ("datasets", DATASETS)):
        print(f"{title}:")
        width = max(len(n) for n in registry.names())
        for entry in registry.entries():
            print(f"  {entry.name:<{width}}  {entry.description}")
        print()
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from prunelab.checkpoint import load_checkpoint
    from prunelab.measure.tables import markdown_table

    ckpt = load_checkpoint(args.checkpoint)
    params = dict(ckpt.model.named_parameters())
    rows = []
    for layer in ckpt.masks.stats().layers:
        weight = params[layer.name].detach()
        rows.append({"layer": layer.name, "shape": "x".join(map(str, layer.shape)), "params": layer.total,
                     "kept": layer.kept, "nonzero": int((weight != 0).sum()), "sparsity_pct": 100.0 * layer.sparsity})
    stats = ckpt.masks.stats()
    rows.append({"layer": "total", "shape": "", "params": stats.total, "kept": stats.kept,
                 "nonzero": sum(r["nonzero"] for r in rows), "sparsity_pct": 100.0 * stats.sparsity})
    print(f"checkpoint {args.checkpoint}: model {ckpt.meta['model']}, input {tuple(ckpt.meta['input_shape'])}, "
          f"{ckpt.meta['num_classes']} classes")
    print(markdown_table(rows, (("layer", "layer"), ("shape", "shape"), ("params", "params"), ("kept", "kept (mask)"),
                                ("nonzero", "nonzero (weights)"), ("sparsity_pct", "sparsity %"))))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="prunelab", description="Make PyTorch networks sparse, smaller and faster.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train the digits MLP and prune it iteratively to 90%% sparsity (< 1 min)")
    demo.add_argument("--out", default=None, help="results folder (default: runs/demo)")
    demo.add_argument("--seed", type=int_arg, default=0, help="random seed (default: 0)")
    demo.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                      help="show progress bars (default: on)")
    demo.set_defaults(func=cmd_demo)

    prune = sub.add_parser("prune", help="train, prune and measure a zoo model; writes a results folder")
    prune.add_argument("--config", default=None, help="YAML file with RunConfig keys; flags override it")
    add_config_flags(prune)
    prune.set_defaults(func=cmd_prune)

    lister = sub.add_parser("list", help="every registered criterion, granularity, allocation, method, model, dataset")
    lister.set_defaults(func=cmd_list)

    inspect = sub.add_parser("inspect", help="per-layer sparsity of a saved checkpoint (model + masks)")
    inspect.add_argument("checkpoint", help="checkpoint folder written by prune/demo")
    inspect.set_defaults(func=cmd_inspect)

    from prunelab.cli_compress import add_compress_parser
    from prunelab.cli_layers import add_drop_layers_parser
    from prunelab.cli_lottery import add_lottery_parser
    from prunelab.cli_materialise import add_materialise_parsers
    from prunelab.oneshot_cli import add_oneshot_parser

    add_compress_parser(sub)
    add_materialise_parsers(sub)
    add_oneshot_parser(sub)
    add_lottery_parser(sub)
    add_drop_layers_parser(sub)
    return parser


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: MemoryError, or torch's CPU allocator refusing a size."""
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc)))


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command under the CLI's error contract (every entry point shares it).

    A PrunelabError, a file system refusal and an allocation failure (a size or count too large for this
    machine, e.g. ``--batch-sizes 99999999999``) are one ``error:`` line on stderr and exit status 2.
    """
    try:
        return args.func(args)
    except PrunelabError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file system refusal the checks did not foresee: still one line, no traceback
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}; check the paths given and that they are readable/writable",
              file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise  # a bug in prunelab: keep its traceback
        detail = " ".join(str(exc).split())
        detail = detail[detail.find("you tried"):] if "you tried" in detail else (detail or type(exc).__name__)
        print(f"error: out of memory ({detail[:160]}); a size or count given is too large for this machine -- "
              f"pass smaller values", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def parse_or_status(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace | int:
    """``parser.parse_args(argv)``, or the exit status argparse chose (2 after its one-line error, 0 after
    ``--help``): ``main`` returns every status, as its callers (tests, ``sys.exit(main())``) expect."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_or_status(build_parser(), argv)
    return args if isinstance(args, int) else run_command(args)


if __name__ == "__main__":
    sys.exit(main())
