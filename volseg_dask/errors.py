"""Error classes.

Every error the package raises on purpose derives from :class:`VolsegError`; each subclass also
inherits the matching builtin, so ``except FileNotFoundError`` keeps working for callers who do
not know this package. Messages say what was expected, what was found, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "IncompleteOutputError",
    "ModelFileError",
    "OutputExistsError",
    "OutputLockedError",
    "TrainingError",
    "VolsegError",
    "VolumeFormatError",
    "VolumeNotFoundError",
    "VolumeValueError",
    "WriteFailedError",
]


class VolsegError(Exception):
    """Base class of every error raised on purpose by volseg_dask."""


class VolumeNotFoundError(VolsegError, FileNotFoundError):
    """An input path (file, folder, dataset or array inside a container) does not exist."""


class VolumeFormatError(VolsegError, ValueError):
    """An input exists but cannot be read as a volume: unknown format, corrupt file, wrong shape."""


class VolumeValueError(VolsegError, ValueError):
    """An input volume has values that cannot be used: NaN, wrong dtype, too many labels."""


class ConfigError(VolsegError, ValueError):
    """A settings file or argument is invalid; the message names the key."""


class OutputExistsError(VolsegError, FileExistsError):
    """The output path exists and overwriting was not requested."""


class OutputLockedError(VolsegError, RuntimeError):
    """Another live process is writing the same output."""


class IncompleteOutputError(VolsegError, RuntimeError):
    """An input was produced by a run that did not finish."""


class WriteFailedError(VolsegError, OSError):
    """Writing an output failed part-way; the partial output was removed or left marked incomplete."""


class ModelFileError(VolsegError, ValueError):
    """A model file is missing, not ours, damaged, of a newer format, or does not fit the data."""


class TrainingError(VolsegError, RuntimeError):
    """Training could not produce a model (e.g. the loss diverged before any epoch finished)."""
