"""User-facing errors: the CLI prints these as one line (no traceback) and exits non-zero."""


class DiffctlError(Exception):
    """Something the user can fix; the message says what was wrong and how to fix it."""


class ConfigError(DiffctlError, ValueError):
    """A config value or combination that cannot work."""


class CheckpointError(DiffctlError):
    """A checkpoint that is missing, unreadable, unsafe or incompatible."""


class DataError(ConfigError):
    """The data config is invalid or the dataset files are missing."""
