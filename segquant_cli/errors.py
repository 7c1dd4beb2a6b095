"""One readable line and a non-zero exit for user errors, instead of a traceback."""

from __future__ import annotations


class CLIError(Exception):
    """A user-facing error: printed as ``segquant: error: <message>``, exit code 2."""
