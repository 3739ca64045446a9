"""User-facing errors.

Every error that a user can cause with bad input (a missing file, a wrong shape, an unknown config
key) is an :class:`OccDistillError` whose message names the file, sample or key and the problem in
one line. The command line prints that line and exits non-zero; tracebacks are for our bugs.
"""


class OccDistillError(Exception):
    """Bad input or an unmet precondition, described in one line for the user."""


class ConfigError(OccDistillError):
    """A config file or ``key=value`` override is invalid."""


class DataError(OccDistillError):
    """A dataset file is missing, malformed or inconsistent."""
