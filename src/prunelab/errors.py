"""User-facing errors.

Every error a user can cause by bad input (a wrong name, an impossible sparsity, a
corrupt file) is raised as :class:`PrunelabError`.  Its message is one line that says
what was given, what was expected and how to fix it.  The CLI catches exactly this
type, prints ``error: <message>`` and exits with status 2, so no traceback reaches a
user for a mistake they can fix.  Anything else that escapes is a bug in prunelab.
"""

from __future__ import annotations


class PrunelabError(ValueError):
    """A problem with the user's input, described in one actionable line."""
