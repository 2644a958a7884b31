"""Errors a user can act on; the message always names the key, file or value at fault."""


class ConfigError(ValueError):
    """A bad setting in a config file or a command-line override."""


class DataError(RuntimeError):
    """A dataset that is missing, empty or holds an unreadable file."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or from another architecture."""
