"""Progress output: a live bar on a terminal, a few plain lines anywhere else.

tqdm redraws its bar in place with carriage returns.  Written to a log file, a pipe or a
CI console (``prunelab prune ... 2> log``) that becomes one long line full of ``'\\r'``
and hundreds of stale bars.  :func:`progress_bar` is the one place prunelab decides how
progress is shown: tqdm's bar when the stream is a terminal, otherwise a
:class:`LineProgress` that prints a plain line each time another tenth of the work is
done (and at least once a minute), never a ``'\\r'``.  Either way the caller drives it
with tqdm's ``update`` / ``set_postfix`` / ``close``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any

__all__ = ["LineProgress", "is_terminal", "progress_bar"]


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal; ``False`` for files, pipes, closed or odd streams."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty(), or a closed stream
        return False


class LineProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` as plain lines for a non-terminal ``stream``.

    A line is written when the steps done reach the next ``1/lines`` of ``total`` (so at
    most ``lines`` of them, the last at 100%), or when ``every_s`` seconds have passed
    since the last line (a long bar still shows signs of life in a CI log).  A line reads
    ``"{desc}: {n}/{total} ({percent}%) {elapsed:.1f} s, {postfix}"``, e.g.
    ``"dense: 3/6 (50%) 0.4 s, loss=0.1234"``.  ``total <= 0`` writes nothing.
    """

    def __init__(self, total: int, desc: str, stream: IO[str], lines: int = 10, every_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.desc, self.stream = int(total), desc, stream
        self.lines, self.every_s, self.clock = lines, every_s, clock
        self.n = 0
        self.postfix = ""
        self._started = self._last = clock()
        self._shown = 0  # tenths (for lines=10) of the total already written

    def update(self, n: int = 1) -> None:
        """Count ``n`` more steps done; write a line when another part is complete or ``every_s`` has passed."""
        self.n += n
        if self.total <= 0:
            return
        part = min(self.lines, self.n * self.lines // self.total)
        now = self.clock()
        if part > self._shown or now - self._last >= self.every_s:
            self._shown = max(self._shown, part)
            self._last = now
            self._write(now)

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        """Show ``key=value`` pairs (e.g. ``loss="0.1234"``) at the end of the next line; writes nothing itself."""
        del refresh  # tqdm's redraw-now flag: a line is only ever written by update()
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        """Nothing to erase or finish: every line written is already complete."""

    def _write(self, now: float) -> None:
        percent = 100 * self.n // self.total
        tail = f", {self.postfix}" if self.postfix else ""
        self.stream.write(f"{self.desc}: {self.n}/{self.total} ({percent}%) {now - self._started:.1f} s{tail}\n")
        self.stream.flush()


def progress_bar(total: int, desc: str, enabled: bool, *, bar: Callable[..., Any] | None = None,
                 stream: IO[str] | None = None, **bar_options: Any) -> Any:
    """The progress display for ``total`` steps of ``desc``, drawn on ``stream`` (default: ``sys.stderr`` now).

    On a terminal: ``bar`` (default :class:`tqdm.tqdm`) with ``leave=False`` and
    ``bar_options`` (e.g. ``mininterval``).  On anything else (a file, a pipe, CI): a
    :class:`LineProgress`.  Disabled (``enabled=False``, e.g. ``--no-progress`` or a
    non-main rank): a ``bar`` with ``disable=True``, which shows nothing.
    """
    stream = sys.stderr if stream is None else stream
    if enabled and not is_terminal(stream):
        return LineProgress(total, desc, stream)
    if bar is None:
        from tqdm import tqdm as bar
    return bar(total=total, desc=desc, leave=False, disable=not enabled, file=stream, **bar_options)
