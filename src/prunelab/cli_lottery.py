"""``prunelab lottery``: search for lottery tickets with rewinding, resumable round by round.

    prunelab lottery --model lenet300 --dataset mnist --rounds 7 --rewind-iter 0 --out runs/lottery
    prunelab lottery ... --rounds 10 --resume runs/lottery      # continue after the last finished round

The run folder is :func:`prunelab.methods.lottery.run_lottery`'s (``config.json``, one
``round_RRR/`` per finished round with its mask, trained weights and metrics) plus, after
every run, ``results.json``, ``report.md`` and a checkpoint of the last round's ticket
(``model.safetensors`` + ``masks.safetensors`` + ``checkpoint.json``) that ``prunelab
inspect``, ``materialise`` and ``compress`` read.  An interrupted run keeps every finished
round; ``--resume DIR`` continues it (only ``--rounds`` may change) and refuses a folder
written by another configuration, naming the keys that differ.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from prunelab.cli import float_arg, int_arg
from prunelab.errors import PrunelabError

ROUND_COLUMNS = (
    ("round", "round"), ("remaining_pct", "weights left %"), ("ticket_acc_pct", "ticket acc %"),
    ("ticket_es_acc_pct", "ticket acc % (early stop)"), ("ticket_es_step", "early-stop iter"),
    ("reinit_acc_pct", "reinit acc %"), ("reinit_es_acc_pct", "reinit acc % (early stop)"),
)


def add_lottery_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "lottery", help="lottery tickets: IMP with rewinding to iteration K, random-reinit control, resumable",
        description="Iterative magnitude pruning with rewinding (Frankle & Carbin 2019; Frankle et al. 2020).")
    parser.add_argument("--model", default="lenet300", help="zoo model (prunelab list), default lenet300")
    parser.add_argument("--dataset", default="mnist", help="zoo dataset, default mnist")
    parser.add_argument("--data-dir", default=None, help="MNIST folder (default: $PRUNELAB_DATA, else ~/.cache/prunelab/mnist)")
    parser.add_argument("--download", action="store_true", help="fetch and sha256-check MNIST when missing")
    parser.add_argument("--rounds", type=int_arg, default=5, help="pruning rounds after the dense round 0 (default 5)")
    parser.add_argument("--rate", type=float_arg, default=0.2, help="fraction of each layer's remaining weights pruned per round")
    parser.add_argument("--output-rate", type=float_arg, default=0.1, help="per-round rate of the output layer (F&C: 0.1)")
    parser.add_argument("--rewind-iter", type=int_arg, default=0,
                        help="rewind survivors to the weights after K steps of round 0 (0: the initialisation)")
    parser.add_argument("--reinit", action=argparse.BooleanOptionalAction, default=True,
                        help="also train each round's mask from a random re-initialisation (the control)")
    parser.add_argument("--epochs", type=int_arg, default=5, help="training epochs per round")
    parser.add_argument("--batch-size", type=int_arg, default=60)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--lr", type=float_arg, default=1.2e-3)
    parser.add_argument("--eval-every", type=int_arg, default=500, help="steps between evaluations (early-stopping iteration)")
    parser.add_argument("--seed", type=int_arg, default=0)
    parser.add_argument("--out", default=None, help="run folder to create (default runs/lottery)")
    parser.add_argument("--resume", default=None, metavar="DIR", help="continue the run folder DIR after its last finished round")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    parser.set_defaults(func=cmd_lottery)


def _config(args: argparse.Namespace):
    from prunelab.bench.training import TrainConfig
    from prunelab.methods.lottery import LotteryConfig

    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                        lr_schedule="constant", weight_decay=0.0, seed=args.seed, progress=args.progress)
    return LotteryConfig(rounds=args.rounds, rate=args.rate, output_rate=args.output_rate, rewind_step=args.rewind_iter,
                         train=train, eval_every=args.eval_every, reinit_rounds=None if args.reinit else ())


def _round_rows(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for m in rounds:
        row = {"round": m["round"], "remaining_pct": m["remaining_pct"],
               "ticket_acc_pct": 100.0 * m["ticket"]["accuracy"],
               "ticket_es_acc_pct": 100.0 * m["ticket"]["early_stop_accuracy"],
               "ticket_es_step": m["ticket"]["early_stop_step"]}
        if m.get("reinit"):
            row["reinit_acc_pct"] = 100.0 * m["reinit"]["accuracy"]
            row["reinit_es_acc_pct"] = 100.0 * m["reinit"]["early_stop_accuracy"]
        rows.append(row)
    return rows


def _check_resume_record(path: Path) -> None:
    """Refuse a ``--resume`` folder whose ``config.json`` is not a JSON object (a list, a number, ...).

    ``lottery_folder.check_resume`` reads it as a dict (``saved.get``): anything else was an AttributeError.
    """
    import json

    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # unreadable / not JSON: check_resume names the reason
    if not isinstance(record, dict):
        raise PrunelabError(f"{str(path)!r} holds a JSON {type(record).__name__}, not a lottery run config; "
                            "pass the folder of an earlier 'prunelab lottery' run to --resume, or --out to start one")


def empty_round(sizes: dict[str, int], rates: dict[str, float]) -> int | None:
    """The first round after which no later round changes the mask: every layer with a rate > 0 keeps
    none of its weights (round ``r`` keeps ``round(n (1 - p)^r)``, as :mod:`prunelab.methods.lottery`);
    None when no layer is ever emptied (every rate 0)."""
    last = None
    for name, n in sizes.items():
        rate = rates[name]
        if n == 0 or rate <= 0.0 or math.log1p(-rate) == 0.0:  # a rate below float precision never empties it
            continue
        r = max(0, math.ceil(math.log(0.5 / n) / math.log1p(-rate)) - 2)  # then step to the exact rounding
        while round(n * (1.0 - rate) ** r) > 0:
            r += 1
        while r > 0 and round(n * (1.0 - rate) ** (r - 1)) == 0:
            r -= 1
        last = r if last is None else max(last, r)
    return last


def check_rounds(model, config, model_name: str) -> None:
    """Refuse ``--rounds`` beyond the round that empties every layer (later rounds would retrain the same empty
    mask: ``--rounds 1000000000`` would run for ever writing identical rounds)."""
    from prunelab.methods.lottery import _layer_rates
    from prunelab.targets import prunable_parameters

    params = prunable_parameters(model, config.exclude)
    rates = _layer_rates(list(params), config)
    limit = empty_round({n: p.numel() for n, p in params.items()}, rates)
    output_rate = config.rate if config.output_rate is None else config.output_rate
    rates_given = f"--rate {config.rate:g} / --output-rate {output_rate:g}"
    if limit is None and config.rounds > 0:
        raise PrunelabError(f"{rates_given} prune nothing, so every round would retrain round 0's dense mask; "
                            "pass a --rate > 0 (or --rounds 0)")
    if limit is not None and config.rounds > limit:
        raise PrunelabError(f"--rounds {config.rounds:,}: by round {limit} every pruned layer of {model_name} has no "
                            f"weight left ({rates_given} of the remaining weights pruned per round), so later rounds "
                            f"would retrain the same empty mask; pass --rounds {limit} or fewer")


def _count(n: int, noun: str) -> str:
    """``n noun``, plural unless ``n`` is 1: ``1 pruning round``, ``2 pruning rounds``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def cmd_lottery(args: argparse.Namespace) -> int:
    from prunelab.bench.datasets import DATASETS, load_dataset, make_loaders
    from prunelab.bench.models import MODELS, build_model
    from prunelab.checkpoint import save_checkpoint
    from prunelab.io import write_json, write_text
    from prunelab.measure.tables import markdown_table
    from prunelab.methods.lottery import run_lottery
    from prunelab.methods.lottery_folder import finished_rounds
    from prunelab.run_checks import check_dataset_files

    for flag, value, minimum in (("--rounds", args.rounds, 0), ("--epochs", args.epochs, 1),
                                 ("--eval-every", args.eval_every, 1), ("--rewind-iter", args.rewind_iter, 0),
                                 ("--batch-size", args.batch_size, 1)):
        if value < minimum:
            why = " (a ticket is found by training)" if flag == "--epochs" else ""
            raise PrunelabError(f"{flag} must be an integer >= {minimum}{why}, got {value}")
    for flag, value in (("--out", args.out), ("--resume", args.resume)):
        if value is not None and not value.strip():
            raise PrunelabError(f"{flag} is empty; name the run folder, or leave {flag} out "
                                "(a new run goes to runs/lottery)")
    # resolved: runs/x, /abs/path/to/runs/x and runs/../runs/x (or a symlink to it) are one folder
    if args.resume and args.out and Path(args.out).resolve() != Path(args.resume).resolve():
        raise PrunelabError(f"--out {args.out!r} and --resume {args.resume!r} name different folders; pass only --resume DIR")
    if args.resume and not (Path(args.resume) / "config.json").is_file():
        raise PrunelabError(f"--resume {args.resume!r} holds no lottery run (no config.json); "
                            "pass the folder of an earlier 'prunelab lottery' run, or --out to start one")
    if args.resume:
        _check_resume_record(Path(args.resume) / "config.json")
    out = Path(args.resume or args.out or "runs/lottery")
    if out.exists() and not out.is_dir():
        raise PrunelabError(f"run folder {str(out)!r} is a file; choose a new folder for --out")
    last = finished_rounds(out) - 1 if args.resume else -1  # the last finished round, -1 for none
    if last > args.rounds:
        raise PrunelabError(f"--resume {str(out)!r} already holds rounds up to {last}, but --rounds is "
                            f"{args.rounds}: that would replace its results and last-ticket checkpoint with round "
                            f"{args.rounds}'s; pass --rounds {last} or more (earlier tickets are in round_NNN/)")
    if not args.resume and out.exists() and any(out.iterdir()):
        raise PrunelabError(f"{str(out)!r} is not empty; pass --resume {out} to continue the run there, or a new --out")
    config = _config(args)
    MODELS.get(args.model)  # unknown names fail here, before any data is read, listing the valid ones
    DATASETS.get(args.dataset)
    check_dataset_files(args.dataset, args.data_dir, args.download)  # as prune: digits reads no files
    splits = load_dataset(args.dataset, args.data_dir, args.download)
    check_rounds(build_model(args.model, splits.input_shape, splits.num_classes), config, args.model)
    train_loader, test_loader = make_loaders(splits, config.train.batch_size, args.seed)
    result = run_lottery(lambda: build_model(args.model, splits.input_shape, splits.num_classes),
                         train_loader, test_loader, config, out, resume=bool(args.resume))
    rows = _round_rows(result.rounds)
    table = markdown_table(rows, ROUND_COLUMNS)
    record = {"model": args.model, "dataset": args.dataset, "config": config.to_dict(), "rounds": result.rounds,
              "resumed_rounds": result.resumed_rounds}
    meta = {"model": args.model, "dataset": args.dataset, "input_shape": list(splits.input_shape),
            "num_classes": splits.num_classes, "config": {"method": "lottery", **config.to_dict()}}
    save_checkpoint(out, result.model, result.masks[-1], meta)
    write_json(out / "results.json", record)
    write_text(out / "report.md", f"# lottery tickets: {args.model} / {args.dataset}\n\n{table}\n")
    print(table)
    print()
    print(f"{_count(len(result.rounds) - 1, 'pruning round')} after the dense round 0; "
          f"{_count(result.resumed_rounds, 'finished round')} read back from the folder, "
          f"{len(result.rounds) - result.resumed_rounds} trained now; "
          f"last ticket {rows[-1]['remaining_pct']:.1f}% of weights left")
    print(f"run folder: {out} (resume with --resume {out}); checkpoint of the last ticket: {out}/")
    return 0
