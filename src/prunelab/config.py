"""The run configuration: one typed dataclass, mirrored one-to-one by CLI flags and YAML.

``prunelab prune --config run.yaml`` and ``prunelab prune --model ... --sparsity ...``
build the same :class:`RunConfig`; flags given on the command line override the file.
A run directory defaults to ``runs/<model>-<method>-<hash>``, the hash of the config
(OpenLTH), so equal configs land in the same place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from prunelab.errors import PrunelabError


# Numbers beyond these reach torch (float32 hyper-parameters, int64 sizes and counters) as overflow
# errors deep inside training: the CLI flags, ``--config`` files and TrainConfig all refuse them.
FLOAT32_MAX = 3.4028234663852886e38
INT64_MAX = 2**63 - 1


def beyond_torch(value: object, as_float: bool = False) -> str | None:
    """Why torch cannot hold ``value`` ("at most ... in magnitude" / "beyond float32, ..."); None if it can.

    Ints past int64 and finite floats past float32 are refused (``as_float``: ``value`` is a
    float32 hyper-parameter even when given as an int).  nan / inf, bools and non-numbers
    pass: each option's own check names its range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if as_float or not isinstance(value, numbers.Integral):
        if not isinstance(value, numbers.Integral) and not math.isfinite(value):
            return None
        return f"beyond float32, {FLOAT32_MAX:.3g}" if abs(value) > FLOAT32_MAX else None
    return f"at most {INT64_MAX:.3g} in magnitude" if abs(value) > INT64_MAX else None


def _opt(help: str, **extra: Any) -> Any:
    return field(metadata={"help": help}, **extra)


@dataclass(frozen=True)
class RunConfig:
    """Everything a ``prune`` run needs; every field is a CLI flag and a YAML key."""

    model: str = _opt("zoo model name (see 'prunelab list')", default="digits_mlp")
    dataset: str = _opt("dataset name (see 'prunelab list')", default="digits")
    data_dir: str | None = _opt("folder with the MNIST IDX .gz files (default: $PRUNELAB_DATA, else "
                                   "~/.cache/prunelab/mnist)", default=None)
    download: bool = _opt("download missing dataset files (checksum-verified)", default=False)
    method: str = _opt("pruning method, e.g. oneshot, iterative, gradual, snip, lottery, rigl (all: 'prunelab list')",
                        default="iterative")
    criterion: str = _opt("importance criterion (see 'prunelab list')", default="magnitude")
    granularity: str = _opt("unstructured | vector | kernel | channel | neuron | N:M such as 2:4", default="unstructured")
    allocation: str = _opt("global | uniform | erk | lamp", default="global")
    layer_floor: bool = _opt("with --allocation global and a structured granularity (vector, kernel, channel, neuron): "
                             "keep at least one group of every layer, so the global threshold never cuts a layer off; "
                             "--no-layer-floor drops the floor (to study layer collapse); default: on", default=True)
    sparsity: float | None = _opt("target fraction of weights removed, in [0, 1) (default 0.9; with an N:M "
                                  "granularity, 1 - N/M)", default=None)
    rounds: int = _opt("pruning rounds of 'iterative' / 'lottery'", default=5)
    layer_rates: dict[str, float] = _opt("per-round rate overrides of 'iterative' / 'lottery', e.g. fc3=0.1,fc2=0.3 "
                                         "(in YAML: {fc3: 0.1, fc2: 0.3})",
                                         default_factory=dict)
    keep_first: str | None = _opt("first layer: 'dense', 'none' or a maximum sparsity", default=None)
    keep_last: str | None = _opt("last layer: 'dense', 'none' or a maximum sparsity (default: 'dense' with a "
                                 "channel / neuron granularity, whose cuts would remove model outputs; else 'none')",
                                 default=None)
    exclude: tuple[str, ...] = _opt("layer name glob never pruned; repeat the flag for several (in YAML: a list)",
                                    default=())
    pretrain_epochs: int = _opt("dense training epochs before pruning", default=30)
    finetune_epochs: int = _opt("retraining epochs after each pruning event", default=8)
    epochs: int = _opt("training epochs of 'gradual' and every from-scratch method (snip, rigl, ...; "
                       "'lottery': per round)", default=30)
    num_updates: int = _opt("mask updates of the 'gradual' cubic schedule", default=10)
    start_epoch: int = _opt("epoch at which 'gradual' starts pruning (t0 of Zhu & Gupta's cubic schedule), "
                            "0 <= start < --epochs (default 0)", default=0)
    end_fraction: float = _opt("fraction of --epochs, in (0, 1], at which mask changes stop: 'gradual' reaches "
                               "--sparsity there (t0 + n dt), and 'set' / 'dsr' / 'rigl' / 'snfs' stop rewiring there "
                               "(RigL's T_end); must lie after --start-epoch (default 0.75)", default=0.75)
    batch_size: int = _opt("training batch size", default=64)
    optimizer: str = _opt("sgd | adam | adamw", default="sgd")
    lr: float = _opt("learning rate for dense training, and for the training of the sparse-from-scratch methods",
                     default=0.05)
    finetune_lr: float | None = _opt("learning rate after a trained model is pruned: retraining, and the training "
                                     "'gradual' prunes during (default: lr / 5)", default=None)
    momentum: float = _opt("SGD momentum", default=0.9)
    weight_decay: float = _opt("weight decay", default=1e-4)
    lr_schedule: str = _opt("constant | cosine | step", default="cosine")
    score_batches: int = _opt("batches used by data-driven criteria (taylor, obd, snip, ...)", default=8)
    delta_t: int = _opt("steps between mask updates of dynamic sparse training (set, dsr, rigl, snfs)", default=100)
    alpha: float = _opt("initial drop/grow fraction of dynamic sparse training, decays by cosine", default=0.3)
    slimming_strength: float = _opt("L1 penalty on BatchNorm scales during dense training (network slimming)", default=0.0)
    seed: int = _opt("random seed", default=0)
    out: str | None = _opt("output folder (default: runs/<model>-<method>-<config hash>)", default=None)
    progress: bool = _opt("show progress bars", default=True)

    def __post_init__(self) -> None:
        if self.sparsity is None:  # N:M fixes the sparsity: unset means 1 - N/M there, 0.9 elsewhere
            object.__setattr__(self, "sparsity", _default_sparsity(self.granularity))

    def digest(self) -> str:
        """Hash of everything that changes the result (not out/progress).

        A field of :data:`LATER_FIELDS` left at its default stays out of the hash, so a config that
        does not set it keeps the ``runs/<model>-<method>-<hash>`` folder it had before the field existed.
        """
        payload = {k: _hashed_value(k, v) for k, v in dataclasses.asdict(self).items()
                   if k not in ("out", "progress", "data_dir", "download")
                   and not (k in LATER_FIELDS and v == field_default(k))}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]

    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out).expanduser()  # a YAML 'out: ~/runs/x' means the home folder, as data_dir does
        return Path("runs") / f"{self.model}-{self.method}-{self.digest()}"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["exclude"] = list(self.exclude)
        return data


FIELD_NAMES = tuple(f.name for f in fields(RunConfig))
FLOAT_FIELDS = ("sparsity", "end_fraction", "lr", "finetune_lr", "momentum", "weight_decay", "alpha", "slimming_strength")


def _hashed_value(name: str, value: Any) -> Any:
    """``value`` of field ``name`` as :meth:`RunConfig.digest` hashes it: equal runs hash equally.

    A number field holds a float whichever way it was given (``RunConfig(lr=1)`` from Python and
    ``lr: 1`` in YAML, which becomes 1.0, are one run), and ``exclude`` is a set of globs (order
    and repeats change nothing).  Values already in that form hash exactly as before.
    """
    if name in FLOAT_FIELDS and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if name == "exclude" and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return sorted(set(value))
    if name == "layer_rates" and isinstance(value, dict):
        return {k: _hashed_value("lr", v) for k, v in value.items()}  # rates are floats, as YAML's are made
    if name in NUMBER_OR_WORD_FIELDS and isinstance(value, str):
        return _number_text(value)
    return value


NUMBER_OR_WORD_FIELDS = ("keep_first", "keep_last")  # 'dense', 'none' or a number, held as the text given


def _number_text(text: str) -> str:
    """``text`` as the one spelling of its number: ``.5``, ``0.50`` and ``5e-1`` -> ``'0.5'`` (``repr(float)``),
    and a whole number as an int: ``0``, ``0.0`` and ``0e0`` -> ``'0'``.

    A word (``'dense'``, ``'none'``) or a non-finite number stays as given.  The spellings
    ``--keep-first 0.5`` / ``0`` and YAML ``keep_first: 0.5`` / ``0`` gave before keep their hashes.
    """
    try:
        number = float(text)
    except ValueError:
        return text
    if not math.isfinite(number):
        return text
    return str(int(number)) if number.is_integer() else repr(number)


LATER_FIELDS = ("layer_floor", "start_epoch", "end_fraction")  # added after run folders were first hashed


def field_default(name: str) -> Any:
    """RunConfig's default for field ``name`` (a fresh one for ``default_factory`` fields)."""
    spec = RunConfig.__dataclass_fields__[name]
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default


def non_default_fields(config: RunConfig) -> frozenset[str]:
    """Names of the fields whose value differs from RunConfig's default (``sparsity`` by its resolved value).

    What an API caller (or a YAML file, which may repeat every default, e.g. a results.json
    ``config``) asked for; the CLI adds every flag given on the command line.
    """
    resolved = {"sparsity": _default_sparsity(config.granularity)}
    return frozenset(f.name for f in fields(RunConfig)
                     if getattr(config, f.name) != resolved.get(f.name, field_default(f.name)))
DEFAULT_SPARSITY = 0.9


def _default_sparsity(granularity: str) -> float:
    from prunelab.structure import get_granularity

    try:
        pattern = get_granularity(granularity)
    except PrunelabError:
        return DEFAULT_SPARSITY  # an unknown granularity is refused by validate(), with the valid names
    return pattern.sparsity if pattern.is_pattern else DEFAULT_SPARSITY


OPTIONAL_STRINGS = ("data_dir", "out")  # str or None


def _checked_value(key: str, value: Any, source: str) -> Any:
    """``value`` for field ``key`` as RunConfig holds it; a one-line error when YAML gave the wrong type."""
    default = RunConfig.__dataclass_fields__[key]
    kind = type(default.default) if default.default is not dataclasses.MISSING else None

    def wrong(expected: str) -> PrunelabError:
        return PrunelabError(f"{key} in {source} must be {expected}, got {value!r} ({type(value).__name__})")

    if key == "exclude":
        if value is None:
            return ()
        items = (value,) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise wrong("a layer-name glob or a list of them")
        return tuple(items)
    if key == "layer_rates":
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()):
            raise wrong("a mapping of layer-name glob to rate, e.g. {fc3: 0.1}")
        return {k: float(v) for k, v in value.items()}
    if key in ("keep_first", "keep_last"):
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise wrong("'dense', 'none' or a maximum sparsity")
        return str(value)
    if key in ("finetune_lr", "sparsity"):
        if value is None:
            return None
        kind = float
    if key in OPTIONAL_STRINGS:
        if value is not None and not isinstance(value, str):
            raise wrong("a path (a string)")
        return value
    if kind is bool and not isinstance(value, bool):
        raise wrong("true or false")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise wrong("an integer")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        return float(value)
    if kind is str and not isinstance(value, str):
        raise wrong("a string")
    return value


def config_from_mapping(values: dict[str, Any], source: str = "config") -> RunConfig:
    """Build a RunConfig, refusing unknown keys (with the list of valid ones) and values of the wrong type."""
    unknown = sorted((str(k) for k in set(values) - set(FIELD_NAMES)), key=str)
    if unknown:
        raise PrunelabError(f"unknown key(s) {', '.join(unknown)} in {source}; valid keys: {', '.join(FIELD_NAMES)}")
    values = {key: _checked_value(key, value, source) for key, value in values.items()}
    try:
        return RunConfig(**values)
    except TypeError as exc:
        raise PrunelabError(f"invalid {source}: {exc}") from None


# YAML 1.2 core-schema numbers (plus YAML 1.1's '_' digit separators), for _config_loader: an exponent
# needs no dot ('1e-4' is a float, YAML 1.1 made it a string) and no base-60 ('2:4' is a string, not 124)
YAML_FLOAT = r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$"""
YAML_INT = r"""^(?:[-+]?0b[0-1_]+
    |[-+]?0o[0-7_]+
    |[-+]?0[0-7_]+
    |[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$"""


def _config_loader(source: str) -> type:
    """A ``yaml.SafeLoader`` for config files: YAML 1.2 numbers, and a key given twice is refused.

    PyYAML implements YAML 1.1, whose quirks turn config values into other types than the
    flags give: ``2:4`` is the base-60 int 124 and ``1e-4`` (no dot) a string.  This loader
    resolves ints and floats as YAML 1.2's core schema does (keeping 1.1's ``0b``/``0x``/octal
    ints and ``_`` separators); every other type resolves as before.  ``source`` names the file
    in the duplicate-key error.
    """
    import re

    import yaml

    int_tag, float_tag = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
    numbers = {int_tag: re.compile(YAML_INT, re.X), float_tag: re.compile(YAML_FLOAT, re.X)}
    # a fresh table (SafeLoader's own is left alone): the int and float patterns swapped in place
    resolvers = {first: [(tag, numbers.get(tag, regexp)) for tag, regexp in entries]
                 for first, entries in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    class ConfigLoader(yaml.SafeLoader):
        yaml_implicit_resolvers = resolvers

        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<: *base' may be overridden by the mapping's own keys
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                try:
                    repeated = key in seen
                except TypeError:  # an unhashable key: the SafeLoader's own error follows
                    break
                if repeated:
                    where = f"line {line}" if seen[key] == line else f"lines {seen[key]} and {line}"
                    raise PrunelabError(f"config file {source!r} sets {key!r} twice ({where}); a key may appear once "
                                        "in a mapping -- keep the one you mean")
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return ConfigLoader


def load_yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if path.is_dir():
        raise PrunelabError(f"config file {str(path)!r} is a folder; pass a YAML file with RunConfig keys (e.g. run.yaml)")
    if not path.is_file():
        raise PrunelabError(f"config file {str(path)!r} does not exist; pass a YAML file with RunConfig keys")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_config_loader(str(path))) or {}  # noqa: S506 -- a SafeLoader
    except yaml.YAMLError as exc:
        raise PrunelabError(f"cannot parse {str(path)!r} as YAML ({str(exc).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise PrunelabError(f"{str(path)!r} is not UTF-8 text; pass a YAML file with RunConfig keys") from None
    if not isinstance(data, dict):
        raise PrunelabError(f"{str(path)!r} must hold a mapping of RunConfig keys, got {type(data).__name__}")
    return data
