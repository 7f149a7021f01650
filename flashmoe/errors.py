"""Error types that carry a one-line message meant for the user."""


class FlashMoeError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits non-zero."""


class CheckpointError(FlashMoeError):
    """A checkpoint or store is missing, truncated, inconsistent or of an unknown kind."""


class ChecksumError(CheckpointError):
    """An expert record's bytes do not match the checksum recorded in the store."""


class BudgetError(FlashMoeError):
    """The memory budget cannot hold what the model needs."""


class LoadError(FlashMoeError):
    """An expert could not be loaded (I/O error, checksum, dead workers)."""


class ConfigError(FlashMoeError, ValueError):
    """A setting, flag or environment variable has a value that cannot be used."""


class OutputError(FlashMoeError):
    """An output path is not ours to replace, or the disk refused a write (full, read-only)."""


class RuntimeFileError(FlashMoeError, PermissionError):
    """A runtime file (pid file, log, socket) is a link, or not a file of this user."""
