"""Up-front checks of the composed train config: a bad value stops the run in one line naming its key.

:func:`check_config` runs before anything is built, trained or written (``serengeti.training.run.prepare``
calls it first). It checks the type and range of the numeric settings every run uses, the names
chosen from fixed menus (optimizer, scheduler, precision) and the combinations that would
otherwise fail deep inside ``fit``. Settings that belong to one dataset or mixer are checked by
their own constructors, whose messages ``prepare`` prefixes with the config group.

A message reads ``<key>=<value>: expected <what>``, e.g. ``model.n_layer='abc': expected an
integer >= 1``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from serengeti.errors import ConfigError

_ABSENT = object()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


@dataclass(frozen=True)
class Rule:
    """``key`` must hold a value of ``kind`` (``int`` or ``number``) for which ``ok`` holds.

    ``expected`` completes the message "expected ..."; ``nullable`` lets the key be null.
    """

    key: str
    kind: str
    ok: Callable[[Any], bool]
    expected: str
    nullable: bool = False


def _int(key: str, low: int, *, also: tuple[int, ...] = (), nullable: bool = False) -> Rule:
    extra = "".join(f" or {a}" for a in also)
    return Rule(key, "int", lambda v: v >= low or v in also, f"an integer >= {low}{extra}", nullable)


def _positive(key: str, *, nullable: bool = False) -> Rule:
    return Rule(key, "number", lambda v: v > 0, "a number > 0", nullable)


def _at_least_zero(key: str, *, nullable: bool = False) -> Rule:
    return Rule(key, "number", lambda v: v >= 0, "a number >= 0", nullable)


def _steps_or_fraction(key: str, low: int) -> Rule:
    """Lightning's convention: an integer counts batches (or steps), a float is a fraction of an epoch."""
    in_range = (lambda f: 0 <= f <= 1) if low == 0 else (lambda f: 0 < f <= 1)
    return Rule(key, "number", lambda v: v >= low if _is_int(v) else in_range(v),
                f"an integer >= {low} or a fraction in {'[' if low == 0 else '('}0, 1]", nullable=True)


def _fraction(key: str, *, closed: bool) -> Rule:
    if closed:
        return Rule(key, "number", lambda v: 0 <= v <= 1, "a number in [0, 1]")
    return Rule(key, "number", lambda v: 0 <= v < 1, "a probability in [0, 1)")


RULES: tuple[Rule, ...] = (
    Rule("seed", "int", lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    # optimizer
    _positive("optimizer.lr"),
    _at_least_zero("optimizer.weight_decay"),
    _positive("optimizer.eps"),
    # scheduler
    _int("scheduler.warmup_steps", 0),
    _int("scheduler.total_steps", 1, nullable=True),
    _fraction("scheduler.min_lr_ratio", closed=True),
    _fraction("scheduler.warmup_init_ratio", closed=True),
    # model (the mixer's own options are checked by the mixer)
    _int("model.n_layer", 1),
    _int("model.d_model", 1),
    _int("model.d_inner", 1, nullable=True),
    _int("model.vocab_size", 1, nullable=True),
    _int("model.l_max", 1, nullable=True),
    _int("model.max_position_embeddings", 0, nullable=True),
    _int("model.pad_vocab_size_multiple", 1),
    _fraction("model.embed_dropout", closed=False),
    _fraction("model.resid_dropout", closed=False),
    _positive("model.layer_norm_epsilon"),
    _positive("model.initializer_range"),
    _int("model.attn_cfg.num_heads", 1),
    _fraction("model.attn_cfg.dropout", closed=False),
    # dataset (keys shared by the datamodules; each checks the rest)
    _int("dataset.batch_size", 1),
    _int("dataset.batch_size_eval", 1, nullable=True),
    _int("dataset.global_batch_size", 1, nullable=True),
    _int("dataset.seq_len", 1),
    _int("dataset.num_workers", 0),
    _int("dataset.num_examples", 1),
    _int("dataset.num_test_examples", 1),
    _int("dataset.eval_stride", 1, nullable=True),
    _int("dataset.max_eval_tokens", 1, nullable=True),
    # trainer
    _int("trainer.max_steps", 1, also=(-1,)),
    _int("trainer.max_epochs", 1, also=(-1,), nullable=True),
    _int("trainer.accumulate_grad_batches", 1),
    _int("trainer.log_every_n_steps", 1),
    _int("trainer.check_val_every_n_epoch", 1, nullable=True),
    _int("trainer.num_sanity_val_steps", 0, also=(-1,)),
    _steps_or_fraction("trainer.val_check_interval", 1),
    _at_least_zero("trainer.gradient_clip_val", nullable=True),
    _steps_or_fraction("trainer.limit_train_batches", 0),
    _steps_or_fraction("trainer.limit_val_batches", 0),
    _steps_or_fraction("trainer.limit_test_batches", 0),
    # checkpoints
    _int("callbacks.model_checkpoint.every_n_train_steps", 0, nullable=True),
    _int("callbacks.model_checkpoint.save_top_k", 0, also=(-1,)),
)


def _get(cfg: DictConfig, key: str) -> Any:
    """The resolved value at ``key``, or ``_ABSENT`` when the key (or its group) is not in the config."""
    try:
        return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=True)
    except Exception as e:  # an interpolation that cannot be resolved
        raise ConfigError(f"{key}: cannot be resolved ({e})") from None


def check_rule(cfg: DictConfig, rule: Rule) -> None:
    """Raise :class:`ConfigError` unless ``rule`` holds (an absent key passes)."""
    value = _get(cfg, rule.key)
    if value is _ABSENT or (value is None and rule.nullable):
        return
    typed = _is_int(value) if rule.kind == "int" else _is_number(value)
    if not typed or not rule.ok(value):
        null = " (or null)" if rule.nullable else ""
        raise ConfigError(f"{rule.key}={value!r}: expected {rule.expected}{null}")


def check_choice(cfg: DictConfig, key: str, choices) -> None:
    """Raise :class:`ConfigError` unless the value at ``key`` (if present) is one of ``choices``."""
    value = _get(cfg, key)
    if value is not _ABSENT and value not in choices:
        raise ConfigError(f"{key}={value!r}: expected one of {sorted(set(map(str, choices)))}")


def lightning_precisions() -> tuple:
    """The ``precision`` values Lightning's Trainer accepts (read from its own type hints)."""
    import typing

    from lightning_fabric import connector

    names = ("_PRECISION_INPUT_STR", "_PRECISION_INPUT_STR_ALIAS", "_PRECISION_INPUT_INT")
    return tuple(v for n in names for v in typing.get_args(getattr(connector, n, None)))


def _check_betas(cfg: DictConfig) -> None:
    betas = _get(cfg, "optimizer.betas")
    if betas is _ABSENT:
        return
    if not (OmegaConf.is_list(betas) or isinstance(betas, (list, tuple))) or len(betas) != 2 \
            or not all(_is_number(b) and 0 <= b < 1 for b in betas):
        shown = OmegaConf.to_container(betas) if OmegaConf.is_config(betas) else betas
        raise ConfigError(f"optimizer.betas={shown!r}: expected two numbers in [0, 1)")


def _check_devices(cfg: DictConfig) -> None:
    """``trainer.devices``: a count >= 1, -1 (all), ``auto``, a list of device indices or a string such as ``"0,1"``."""
    devices = _get(cfg, "trainer.devices")
    if devices is _ABSENT or devices is None or devices == "auto":
        return
    if OmegaConf.is_list(devices):
        ok = len(devices) > 0 and all(_is_int(d) and d >= 0 for d in devices)
    elif isinstance(devices, str):
        ok = all(part.strip().isdigit() for part in devices.split(",")) or devices.strip() == "-1"
    else:
        ok = _is_int(devices) and (devices >= 1 or devices == -1)
    if not ok:
        shown = OmegaConf.to_container(devices) if OmegaConf.is_config(devices) else devices
        raise ConfigError(f"trainer.devices={shown!r}: expected a count >= 1, -1 (all), auto, or a list of device indices")


def _check_schedule_length(cfg: DictConfig) -> None:
    if cfg.get("scheduler") is None:
        return
    if cfg.scheduler.get("total_steps") is None and cfg.trainer.get("max_steps", -1) == -1 \
            and cfg.trainer.get("max_epochs") == -1:
        raise ConfigError("trainer.max_steps=-1 with trainer.max_epochs=-1: the learning-rate schedule needs a finite "
                          "length; set trainer.max_steps, trainer.max_epochs or scheduler.total_steps")


def check_config(cfg: DictConfig) -> None:
    """Check the composed train config; raise :class:`ConfigError` naming the first bad key."""
    from serengeti.training.optim import SCHEDULES, WEIGHT_DECAY_POLICIES

    for rule in RULES:
        check_rule(cfg, rule)
    _check_betas(cfg)
    _check_devices(cfg)
    check_choice(cfg, "optimizer.name", ("adamw",))
    check_choice(cfg, "optimizer.weight_decay_policy", WEIGHT_DECAY_POLICIES)
    check_choice(cfg, "scheduler.name", tuple(SCHEDULES))
    precisions = lightning_precisions()
    if precisions:
        check_choice(cfg, "trainer.precision", precisions)
    _check_schedule_length(cfg)

