"""Output folders: a command replaces only its own earlier output, never another command's run.

Every command that writes a whole ``--out`` folder (swapped in by
:func:`prunelab.io.atomic_dir`, which deletes the folder it replaces) declares the files
it writes as an :class:`OutFiles`.  :func:`check_out_folder` lets it replace an absent or
empty folder, or one holding only those files (re-running a command into its own folder);
any other folder -- a lottery run with its rounds, a prune run under ``materialise``, a
folder of the user's -- is a one-line PrunelabError naming what it holds, before any work.

An ``--out`` that is a symbolic link to a folder (run folders kept on another disk) names
the link's target: :func:`link_target` is the folder to check and to swap the new output
in for, so the link stays a link.  A link to nothing is refused, never replaced by a folder.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass
from pathlib import Path

from prunelab.errors import PrunelabError
from prunelab.io import check_replaceable, link_target

__all__ = ["OutFiles", "check_out_folder", "link_target"]


@dataclass(frozen=True)
class OutFiles:
    """The files one command writes into its ``--out`` folder.

    ``command``: the command's name in messages (``"prune"``).  ``names``: the file names
    it writes, exact or :mod:`fnmatch` patterns (``"model-*-of-*.safetensors"``).
    ``output``: what its folder is called (``"run"``, ``"output"``).  ``record``:
    ``(file, key)`` when the command's JSON record ``file`` always holds the top-level
    ``key``, which tells its folders from another command's with the same file names.
    """

    command: str
    names: tuple[str, ...]
    output: str = "output"
    record: tuple[str, str] | None = None

    def writes(self, name: str) -> bool:
        """Whether the command writes a file called ``name``."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.names)

    def foreign(self, folder: Path, entries: list[str]) -> list[str]:
        """The entries of ``folder`` this command did not write (its record, if it is another command's)."""
        others = [name for name in entries if not self.writes(name)]
        if not others and self.record is not None and self.record[0] in entries:
            file, key = self.record
            if key not in (_json_object(folder / file) or {}):
                others = [file]
        return others


def _json_object(path: Path) -> dict | None:
    """The JSON object in ``path``; None when it is unreadable or not an object."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _kinds(folder: Path, entries: list[str]) -> list[tuple[str, str]]:
    """``(command, description)`` of every kind of prunelab output ``folder`` (holding ``entries``) looks like."""
    from prunelab.loading import MATERIALISED_META
    from prunelab.methods.lottery_folder import LOTTERY_FORMAT

    config = _json_object(folder / "config.json") if "config.json" in entries else None
    report = _json_object(folder / "report.json") if "report.json" in entries else None
    found = [
        ("lottery", "a lottery run (written by prunelab lottery)",
         any(name.startswith("round_") for name in entries) or (config or {}).get("format") == LOTTERY_FORMAT),
        ("lottery", "a lottery round", "metrics.json" in entries),
        ("materialise", "a shrunk model (prunelab materialise)", "architecture.json" in entries),
        ("materialise", "a sparse-format model (prunelab materialise)", MATERIALISED_META in entries),
        ("prune", "a prune / demo run", "checkpoint.json" in entries or "results.json" in entries),
        ("oneshot", "a oneshot output", report is not None and "oneshot" in report),
        ("drop-layers", "a drop-layers output", report is not None and "dropped" in report),
        ("", "a oneshot / drop-layers output", "report.json" in entries),
    ]
    return [(command, description) for command, description, holds in found if holds]


def _folder_kind(folder: Path, entries: list[str], writes: OutFiles, others: list[str]) -> str:
    """What ``folder`` holding ``entries`` (``others``: those ``writes`` did not write) is, in words,
    for refusing it to ``writes.command``."""
    for command, description in _kinds(folder, entries):
        if command != writes.command:
            return description
    if writes.record is not None and others == [writes.record[0]]:  # the command's file name, not its record
        file, key = writes.record
        return f"a {file} that is not {writes.command}'s record (no {key!r} key)"
    return f"files {writes.command} does not write"


def check_out_folder(out: str | os.PathLike, writes: OutFiles, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Refuse ``out`` unless it is absent, empty or holds only files ``writes`` declares.

    Checks :func:`link_target` and :func:`prunelab.io.check_replaceable` (``inputs``: what
    the command reads) first.
    Call it before any work and again just before writing: the new output replaces the
    whole folder, so a folder holding anything else would be deleted.  A link to a
    folder is judged by what that folder holds; a dangling link is refused
    (:func:`link_target`).  Creates nothing.
    """
    link_target(out)  # first: check_replaceable's Path.resolve raises RuntimeError on a loop of links
    out = check_replaceable(out, inputs)
    if not out.is_dir():
        return out
    entries = sorted(p.name for p in out.iterdir())
    others = writes.foreign(out, entries)
    if others:
        shown = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
        raise PrunelabError(
            f"--out {str(out)!r} holds {_folder_kind(out, entries, writes, others)} ({shown}), not an earlier "
            f"{writes.command} {writes.output}; {writes.command} replaces its whole --out folder and would delete "
            "it -- choose a new or empty folder for --out"
        )
    return out
