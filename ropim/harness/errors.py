"""Errors a user can act on; the message always names the key, file or value at fault."""

import re

# A run, comparison or method name becomes one folder name: letters, digits and . _ - + = @,
# not starting with a dot, so nothing is ever written outside the folder the user named.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@-]{0,127}")


class ConfigError(ValueError):
    """A bad setting in a config file or a command-line override."""


class DataError(RuntimeError):
    """A dataset that is missing, empty or holds an unreadable file."""


class TrainingError(RuntimeError):
    """Training that cannot go on as configured (a loss that is no longer finite)."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or from another architecture."""


def check_ratio(label: str, value: object) -> float:
    """A share of tokens or pixels: strictly inside (0, 1), else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{label} must lie strictly between 0 and 1, got {value!r}")
    return float(value)


def check_name(key: str, value: object) -> str:
    """A name that becomes one path component (run, comparison, method, imported weights);
    else a ConfigError naming ``key``."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise ConfigError(
            f"{key}={value!r} must be a plain name (letters, digits, _ . - + = @; at most 128 "
            f"characters; no '/', no leading '.'): it becomes one folder name"
        )
    return value
