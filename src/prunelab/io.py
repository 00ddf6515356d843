"""Atomic file writing: results are either complete or absent, never half-written.

A file or folder is written under a temporary name beside its target, flushed to disk
(``fsync`` of every file, then of the folders holding them, where the OS allows it) and
only then renamed over the target with ``os.replace``; the parent folder is flushed after
the rename too.  Without the flush before the rename, a power cut can leave the *new*
name pointing at an empty or truncated file (the rename reached the disk, the data did
not: the ext4 "zero-length file" problem, see ``fsync(2)`` and ``rename(2)``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prunelab.errors import PrunelabError


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check it is a writable directory."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:  # 'afile/sub': mkdir says only "File exists"
            raise PrunelabError(f"cannot create output directory {str(path)!r}: {str(blocking)!r} is a file, not a "
                                "directory; choose another --out") from None
        raise PrunelabError(
            f"cannot create output directory {str(path)!r} ({exc.strerror}); choose a writable --out"
        ) from None
    if not path.is_dir():
        raise PrunelabError(f"output path {str(path)!r} is not a directory; choose a writable --out")
    # os.access() says yes to root everywhere (even /proc): really create a file to be sure
    try:
        fd, probe = tempfile.mkstemp(prefix=".prunelab-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PrunelabError(
            f"output directory {str(path)!r} is not writable: creating a file in it failed ({exc.strerror}); "
            "choose a writable --out"
        ) from None
    return path


# A folder holding one of these was written by prunelab (a run, a checkpoint, a materialised or
# shrunk model, a one-shot/drop-layers output, a lottery round): atomic_dir may replace it.  A
# config.json counts only when prunelab wrote it (its "format" starts with "prunelab.", the char-GPT
# cache): Hugging Face model folders hold one too.
RECORD_FILES: tuple[str, ...] = ("checkpoint.json", "results.json", "architecture.json", "materialised.json",
                                 "report.json", "metrics.json")


def _written_by_prunelab(folder: Path, entries: list[str]) -> bool:
    if any(name in entries for name in RECORD_FILES):
        return True
    if "config.json" not in entries:
        return False
    try:
        record = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and str(record.get("format", "")).startswith("prunelab.")


def _fsync(path: Path) -> None:
    """Flush ``path`` to disk: a file's data (errors propagate), or a folder's entries where supported.

    Folders cannot be opened on Windows and some file systems refuse ``fsync`` on them;
    there the folder flush is skipped (the rename is still atomic, only its durability
    is up to the OS).  Windows needs a writable descriptor to flush a file.
    """
    directory = path.is_dir()
    flags = os.O_RDWR if os.name == "nt" and not directory else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """``_fsync`` every regular file under ``root``, then every folder, deepest first (links are not followed)."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            file = Path(folder) / name
            if not file.is_symlink() and file.is_file():
                _fsync(file)
        _fsync(Path(folder))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, directory: bool) -> None:
    """Give a mkstemp/mkdtemp path the mode a plain open()/mkdir() would have (they create 0600/0700)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _input_folder(source: Path) -> Path:
    """The folder an input names: itself, or the folder holding an input file (``CKPT/checkpoint.json``)."""
    return source.parent if source.is_file() else source


def check_output_file(path: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = (),
                      what: str = "the input") -> Path:
    """Refuse an output *file* path before any work: empty, a folder, or inside an input folder.

    Inside an input folder (``--out CKPT/model.plc``) it would overwrite one of the input's files
    or add a foreign file that makes the folder no longer replaceable by the command that wrote it.
    ``what`` names the inputs in the message (``"the checkpoint"``).  Creates nothing.
    """
    text = os.fspath(path)
    if not text.strip() or Path(text).is_dir():
        raise PrunelabError(f"--out must name a file to write, got {text!r}; e.g. --out model.plc")
    target = Path(text).resolve()
    for source in inputs:
        folder = _input_folder(Path(source).resolve())
        if folder in target.parents:
            raise PrunelabError(f"--out {text!r} is inside {what} {os.fspath(source)!r} being read: it would overwrite "
                                f"a file of {what} or add a foreign one to its folder; write elsewhere")
    return Path(text)


def check_replaceable(path: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Refuse an output folder whose replacement would destroy something, before any work is done.

    ``path`` may be absent, empty, or a folder prunelab wrote (it holds one of
    :data:`RECORD_FILES`).  It may not be a file, a folder of other things (``--out ~``), or
    one of ``inputs`` (or a folder holding one): replacing the checkpoint being read would
    delete it.
    """
    if not os.fspath(path).strip():  # Path("") is ".": the current folder, refused below with a puzzling message
        raise PrunelabError("--out is empty, which names the current folder; replacing it would delete the folder "
                            "you are working in -- name a subfolder such as runs/my-run")
    path = Path(path)
    target = path.resolve()
    for source in inputs:
        source_path = Path(source).resolve()
        if target == source_path or target in source_path.parents:
            raise PrunelabError(
                f"--out {str(path)!r} would replace the input {str(source)!r}; write to a new folder"
            )
        if _input_folder(source_path) in target.parents:
            # the input folder would then hold another command's output: a later re-run into it deletes that
            raise PrunelabError(
                f"--out {str(path)!r} is inside the input {str(source)!r}; write to a folder beside it, not into it"
            )
    if path.is_file():
        raise PrunelabError(f"output path {str(path)!r} is a file; choose a folder for --out")
    here = Path.cwd().resolve()
    if target == here or target in here.parents:
        # the new folder is built beside the old one and swapped in: that would delete the folder you are in
        raise PrunelabError(
            f"--out {str(path)!r} is the current folder{'' if target == here else ' or holds it'}; replacing it would "
            "delete the folder you are working in -- name a subfolder such as runs/my-run"
        )
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        if entries and not _written_by_prunelab(path, entries):
            raise PrunelabError(
                f"refusing to replace {str(path)!r}: it holds {', '.join(entries[:3])}"
                f"{' ...' if len(entries) > 3 else ''} and was not written by prunelab; choose a new or empty folder"
            )
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched.  The
    temporary file is flushed to disk before the rename and the folder after it.
    """
    path = _file_target(path)
    ensure_writable_dir(path.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():
            _publish_mode(tmp, directory=False)
            _fsync(tmp)  # data before the rename: otherwise the rename can reach the disk first (an empty file)
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _file_target(path: str | os.PathLike) -> Path:
    """``path`` as a file to write; an existing folder there is a one-line error (os.replace cannot put a file over it)."""
    path = Path(path)
    if path.is_dir():
        raise PrunelabError(f"cannot write file {str(path)!r}: a folder of that name is there; remove it or choose "
                            "another file name")
    return path


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Temporary paths beside ``paths`` for a set of files written together; renamed over them only when all are written.

    The last path is the record that says the set is complete (``checkpoint.json``): a
    previous one is removed before the renames and the new one is renamed last, so a
    reader that requires it sees the old complete set or the new one -- after a crash
    mid-rename it finds no record (a one-line error), never new files under an old record.
    On any exception before the renames every temporary file is removed and the old files
    are untouched.
    """
    targets = [_file_target(p) for p in paths]
    for folder in {t.parent for t in targets}:
        ensure_writable_dir(folder)
    temps: list[Path] = []
    try:
        for target in targets:
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            temps.append(Path(name))
        yield list(temps)
        for tmp in temps:
            _publish_mode(tmp, directory=False)
            _fsync(tmp)
        targets[-1].unlink(missing_ok=True)
        for tmp, target in zip(temps, targets):
            os.replace(tmp, target)
        for folder in {t.parent for t in targets}:
            _fsync(folder)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")  # what every reader expects, whatever the locale
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``, kernel 3.15+); ``False`` where the OS, libc or file system
    cannot (the caller then falls back to two renames).  Other failures raise ``OSError``."""
    import ctypes
    import errno
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without the wrapper (glibc < 2.28, musl)
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or file system without the flag
        return False
    raise OSError(code, os.strerror(code), str(b))


def link_target(out: str | os.PathLike) -> Path:
    """The folder ``out`` names: ``out`` itself, or the folder a symbolic link ``out`` points to (chains followed).

    Replacing a link by a new folder would move the results off the disk the link leads
    to (``runs/big -> /mnt/disk/big``) and lose the link, so a new output is built beside
    the target and swapped in for it there.  A link to nothing is a one-line
    :class:`PrunelabError`, not a target created on the fly: a missing target is most
    often a disk not mounted, and creating it would write the results under the mount
    point instead.  A loop of links is refused too.  Creates nothing.
    """
    path = Path(out)
    if not path.is_symlink():
        return path
    try:
        return path.resolve(strict=True)
    except (OSError, RuntimeError):  # FileNotFoundError: a missing target; RuntimeError: a loop (Python < 3.13)
        raise PrunelabError(
            f"--out {str(path)!r} is a symbolic link to {os.readlink(path)!r}, which does not exist (or loops); "
            "create the folder it points to (or mount its disk), or remove the link"
        ) from None



@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it replaces ``path`` only on success.

    A previous folder ``path`` is swapped with the new one in one step where the OS can
    (Linux ``renameat2(RENAME_EXCHANGE)``, :func:`_exchange`), so readers see the old
    complete folder or the new complete one, never a mix nor a missing folder; elsewhere
    it is moved aside first and, for the instant between the two renames, ``path`` does
    not exist.  The old folder is deleted after the swap.  Only an
    empty folder or one prunelab wrote is replaced (:func:`check_replaceable`, checked
    before and again after the caller writes).  Every file of the new folder is flushed to
    disk before the swap (whatever wrote it: ``torch.save``, safetensors, ...).  The old
    folder is moved into a fresh ``.name.old-XXXXXXXX`` folder (``tempfile.mkdtemp``), so a
    leftover of an earlier crash never blocks the swap.  A symbolic link ``path`` to a
    folder stays a link: the folder it points to is replaced (the temporary folder is made
    beside that one, on its disk); a dangling link is a one-line error
    (:func:`link_target`).
    """
    import shutil

    path = Path(path)
    path = link_target(path)  # first: check_replaceable's Path.resolve raises RuntimeError on a loop of links
    check_replaceable(path)
    ensure_writable_dir(path.parent if str(path.parent) else Path("."))
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        check_replaceable(path)
        _publish_mode(tmp, directory=True)
        _fsync_tree(tmp)
        aside = old = None
        if path.is_dir() and not path.is_symlink() and _exchange(tmp, path):
            _fsync(path.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # now the previous folder
            return
        if path.exists() or path.is_symlink():
            aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))  # unique, never a leftover
            old = aside / path.name
            try:
                os.replace(path, old)
            except BaseException:
                aside.rmdir()  # nothing was moved: leave no empty .old- folder behind
                raise
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:  # the swap failed: put the previous complete folder back
                os.replace(old, path)
                aside.rmdir()
            raise
        _fsync(path.parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
