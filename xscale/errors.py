"""Errors a user can act on.

Raise :class:`XscaleInputError` for anything the user can fix (bad data, a wrong
key, an unreadable checkpoint). Its message names the key, what was expected, what
was found and what to do. The CLI turns it into one clear line and exit status 2
(``--debug`` shows the traceback); anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class XscaleInputError(ValueError):
    """Bad user input: data, keys, files or options. The message says what to do."""


class CheckpointError(XscaleInputError):
    """A checkpoint that cannot be loaded safely (unknown format, pickle, corrupted)."""
