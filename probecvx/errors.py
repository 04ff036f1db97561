"""Exception and warning classes shared by every part of probecvx.

The command line maps ``ProbecvxError.exit_code`` to the process exit status:
2 for bad usage (a value or path the user passed is invalid), 1 for a run that
failed on valid input.
"""

#: Exit status after Ctrl-C: 128 + SIGINT (2), as shells report it.
INTERRUPTED_EXIT_CODE = 130


class ProbecvxError(Exception):
    """Base class of the errors that probecvx raises on purpose."""

    exit_code = 1


class InvalidInputError(ProbecvxError, ValueError):
    """A value or path given by the caller is invalid; the message says the fix."""

    exit_code = 2


class CheckpointError(ProbecvxError):
    """A checkpoint could not be found, read or loaded into the model."""


class DatasetError(InvalidInputError):
    """The dataset given with ``--data`` could not be read or is invalid.

    It is an :class:`InvalidInputError`, so the command line exits 2 for it,
    as for any other invalid value or path.
    """


class SiteError(InvalidInputError):
    """A probe site name or filter does not match the model."""


class ExtractionError(ProbecvxError):
    """A forward pass failed or produced values that cannot be stored."""


class ShardError(ProbecvxError):
    """A shard is missing, corrupt, or written by an incompatible schema."""


class ReportError(ProbecvxError):
    """A report is missing, corrupt, or written by an incompatible schema."""


class SolverError(ProbecvxError):
    """A probe solver was given data it cannot fit."""


class ConvergenceWarning(UserWarning):
    """A probe solver stopped at its iteration cap before meeting its tolerance."""


class SplitWarning(UserWarning):
    """The train/val/test split leaves some class without train rows."""
