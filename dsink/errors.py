"""The one user-facing error type.

Stages turn a :class:`DsinkError` into a single line on stderr and exit code 2; anything else is a bug
and keeps its traceback. Keeping one type makes "bad input" and "crash" easy to tell apart.
"""

from __future__ import annotations


class DsinkError(Exception):
    """Bad input from the user (params, files, artifacts): the message is the whole report."""
