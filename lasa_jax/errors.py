"""The project's user-facing errors.

A ``LasaError`` means the run cannot go on because of something the user can fix: a config
field, an input file, an artifact an earlier stage left (or did not), the devices. Its message is
one line that names the field or file. ``python -m lasa_jax.main`` prints it as ``error: ...``
and exits with status 2 (``LASA_DEBUG=1`` shows the traceback). Any other exception is a bug in
lasa_jax and keeps its traceback.

The subclasses also derive from the built-in exception a caller would expect (``ValueError`` for
bad values), so library code can catch them either way.
"""
from __future__ import annotations


class LasaError(Exception):
    """A user-facing error; ``str(e)`` is one line naming the field or file."""

    def __init__(self, message: str):
        # One line always: a value echoed into a message may contain newlines.
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


class ConfigError(LasaError, ValueError):
    """A run-config field, or a checkpoint's config.json, asks for something we cannot do."""


class MeshError(ConfigError):
    """A mesh that cannot be built from ``config.mesh`` on these devices."""


class DataError(LasaError, ValueError):
    """A problem in a data file, located by file, line or record, and field."""

    def __init__(self, file: str, where: str | int | None, field: str, problem: str):
        self.file = str(file)
        self.where = "-" if where is None else str(where)
        self.field = field
        self.problem = problem
        super().__init__(f"{self.file}:{self.where}: {field}: {problem}")


class UnknownLanguage(LasaError, ValueError):
    """A language name or code that no table of ours knows."""


class CheckpointError(LasaError, ValueError):
    """A model checkpoint directory is missing, incomplete or inconsistent with its config.json."""


class ArtifactError(LasaError, ValueError):
    """An artifact of an earlier stage (report, SSI, cache, checkpoint) is missing or corrupt."""


class SSIError(ArtifactError):
    """Bad SSI input, config or artifact."""


class FitError(LasaError, RuntimeError):
    """The estimated per-device memory exceeds what the devices have."""


class NonFiniteLoss(LasaError, FloatingPointError):
    """Training produced a non-finite loss or parameters; the message names the last good checkpoint."""


class WorkdirError(LasaError, RuntimeError):
    """The workdir, or a path a run must write, cannot be written (permissions, read-only or full
    file system)."""


class WorkdirLocked(WorkdirError):
    """Another run holds the workdir's lock; the message names its host and process."""
