"""Errors that the command line reports as one line instead of a traceback."""


class LIVEditorError(Exception):
    """A user-facing problem: bad input, a missing file or model component."""
