"""OmegaConf resolvers the configs use; registered when the :mod:`serengeti` package is imported.

``${serengeti.val_epochs:${trainer.val_check_interval}}`` (configs/trainer/cpu.yaml) makes
``trainer.val_check_interval`` the one key for validation frequency: an int N validates every N
training batches counted over the whole run (Lightning's ``check_val_every_n_epoch`` becomes
null), anything else (null, or a float fraction of an epoch) keeps validation per epoch.

``${serengeti.min:a,b}`` is the smaller of two numbers: H3's ``ssm_lr`` is
``${serengeti.min:1.0e-3,${optimizer.lr}}`` (configs/model/mixer/h3.yaml), so it follows the base lr.
``${serengeti.ratio:a,b}`` is ``a / b``: a warmup that starts at the learning rate 1e-6 is
``warmup_init_ratio: ${serengeti.ratio:1.0e-6,${optimizer.lr}}``.
``${serengeti.below:[1,8],${model.n_layer}}`` keeps the block indices below the depth: the 125M hybrids
put attention at blocks 1 and 8, and at ``size=tiny``'s 2 blocks only block 1 remains.
"""
from __future__ import annotations

from omegaconf import OmegaConf


def val_epochs(val_check_interval) -> int | None:
    """``check_val_every_n_epoch`` for a given ``val_check_interval``."""
    is_steps = isinstance(val_check_interval, int) and not isinstance(val_check_interval, bool)
    return None if is_steps else 1


def _numbers(name: str, *values) -> None:
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"${{serengeti.{name}:...}} takes two numbers, got {value!r}")


def minimum(a, b):
    """The smaller of two numbers; a non-number names the resolver."""
    _numbers("min", a, b)
    return min(a, b)


def ratio(a, b) -> float:
    """``a / b`` for a positive ``b``; anything else names the resolver."""
    _numbers("ratio", a, b)
    if b <= 0:
        raise ValueError(f"${{serengeti.ratio:...}} needs a positive divisor, got {b!r}")
    return a / b


def below(indices, n) -> list[int]:
    """The integers of ``indices`` that are smaller than ``n`` (block indices that exist at depth ``n``)."""
    if isinstance(n, bool) or not isinstance(n, int) or not all(isinstance(i, int) for i in indices):
        raise ValueError(f"${{serengeti.below:...}} takes a list of integers and an integer, got {list(indices)!r}, {n!r}")
    return [i for i in indices if i < n]


RESOLVERS = {"serengeti.val_epochs": val_epochs, "serengeti.min": minimum, "serengeti.ratio": ratio,
             "serengeti.below": below}


def register() -> None:
    """Register the resolvers (idempotent)."""
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register()
