"""How the torchrun test workers end (they run from tests/, so they import this directly)."""

import gc
import os
import sys

from prunelab import distributed


def finish() -> None:
    """Barrier, tear gloo down, and leave without interpreter finalisation.

    DDP reducers are freed first, while the interpreter is whole.  Gloo threads still alive
    during finalisation can abort a finished process ("terminate called without an active
    exception", seen once in a fresh-clone test run), so the worker ends with ``os._exit(0)``
    once every rank has passed the barrier and its record is on disk.
    """
    gc.collect()
    distributed.shutdown()  # barrier first: no rank tears gloo down while its peer still talks to it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
