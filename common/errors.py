"""The errors the command line turns into one clear line (``error: <file>: <what>``, exit status 2).

Kept free of torch so that importing them costs nothing (``ctr prepare`` never loads torch). Every
message names the file (and line when known) it is about.
"""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """Another library's error message, whitespace folded to one line and cut at ``limit`` characters,
    to quote inside one of ours."""
    return " ".join(str(exc).split())[:limit]


class DataError(ValueError):
    """Raw or prepared data that cannot be used as it is."""


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and the key."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or not ours."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class ExportError(RuntimeError):
    """An export that failed its parity check, or an edge file that does not match its manifest."""
