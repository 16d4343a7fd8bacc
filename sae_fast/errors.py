"""User-facing errors: the CLI prints them as one line (no traceback unless -v) and exits non-zero."""


class UserError(Exception):
    """Bad input from the user: a file, a gene, an argument. The message names the culprit and the fix."""


class CheckpointError(UserError):
    """A checkpoint that does not match the architecture (missing/unexpected key, wrong shape, wrong vocabulary)."""
