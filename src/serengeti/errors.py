"""The errors serengeti reports to its users: one line naming the key or file and what was expected.

Every layer raises these (data, models, training, evaluation all import them from here), so this
module imports nothing of serengeti. The entry points turn them into ``config error: ...`` /
``error: ...`` and a non-zero exit.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and what was expected."""


class UnsafeConfigError(ValueError):
    """A stored config names a class that is not registered, an unknown option or a non-plain value."""


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not match its config; the message names the file."""


class EvalError(ValueError):
    """Bad evaluation settings or input; the message names the key and what was expected."""
