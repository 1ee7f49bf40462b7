"""User-facing errors: the CLI prints their message on one line and exits with status 2."""


class LongtrainError(Exception):
    """Bad input or environment that the user can fix; never a bug in longtrain."""


class ConfigError(LongtrainError):
    pass


class LaunchError(LongtrainError):
    pass


class CheckpointError(LongtrainError):
    pass


class DataError(LongtrainError):
    pass


class TrainingError(LongtrainError):
    """The run cannot go on (e.g. too many consecutive non-finite steps)."""


class PeerLost(LongtrainError):
    """A collective failed because another process died or stopped answering (not a user error: the
    launcher turns it into the rank-death report)."""
