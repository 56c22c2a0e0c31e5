"""Errors that the command line turns into a one-line message (no traceback)."""


class BDGFError(Exception):
    """A user-facing error: bad input, a missing file, a corrupt store, a mismatched run."""


class InputError(BDGFError, ValueError):
    """Input data is unusable: wrong shape, key, band count, dtype, or no labelled pixels."""


class StoreError(BDGFError):
    """A scene store is missing, corrupt, or would be overwritten without permission."""
