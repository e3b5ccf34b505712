"""The errors the command line turns into one clear line; kept free of torch so that importing them
costs nothing (``ctr prepare`` never loads torch)."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or not ours; the message names the file."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class ExportError(RuntimeError):
    """An export that failed its parity check, or an edge file that does not match its manifest."""
