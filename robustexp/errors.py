"""Errors that name the file or option at fault and say what was expected."""


class RobustexpError(Exception):
    """Base class of the errors robustexp raises for bad input."""


class DatasetError(RobustexpError):
    """A dataset path is missing or its files do not have the expected layout."""


class ConfigError(RobustexpError):
    """A config option has a value robustexp cannot use."""


class NonFiniteLossError(RobustexpError):
    """The training loss became NaN or infinite."""


class CheckpointError(RobustexpError):
    """No usable training checkpoint to resume from (damaged or truncated files)."""
