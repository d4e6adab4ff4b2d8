"""OmegaConf resolvers the configs use; registered when :mod:`serengeti.train` is imported.

``${serengeti.val_epochs:${trainer.val_check_interval}}`` (configs/trainer/cpu.yaml) makes
``trainer.val_check_interval`` the one key for validation frequency: an int N validates every N
training batches counted over the whole run (Lightning's ``check_val_every_n_epoch`` becomes
null), anything else (null, or a float fraction of an epoch) keeps validation per epoch.
"""
from __future__ import annotations

from omegaconf import OmegaConf


def val_epochs(val_check_interval) -> int | None:
    """``check_val_every_n_epoch`` for a given ``val_check_interval``."""
    is_steps = isinstance(val_check_interval, int) and not isinstance(val_check_interval, bool)
    return None if is_steps else 1


def register() -> None:
    """Register the resolvers (idempotent)."""
    if not OmegaConf.has_resolver("serengeti.val_epochs"):
        OmegaConf.register_new_resolver("serengeti.val_epochs", val_epochs)


register()
