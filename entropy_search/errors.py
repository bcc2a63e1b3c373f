"""User-facing errors: the CLI prints their message and exits with status 2, without a traceback."""


class EntropySearchError(Exception):
    """A problem with what the user asked for (bad input, missing data or checkpoint, bad config)."""


class ConfigError(EntropySearchError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


class DataUnavailableError(EntropySearchError):
    """A data set is not on this machine and cannot be fetched; the message says how to get it."""


class CheckpointError(EntropySearchError):
    """A checkpoint is missing, corrupt or does not fit the model."""
