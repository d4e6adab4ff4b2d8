"""Parameter groups, the AdamW builder and learning-rate schedules (stepped per optimizer step).

A parameter tagged where it is created with :func:`serengeti.ops.init.set_optim` (``lr=...``,
``weight_decay=...``) carries its own settings; :func:`param_groups` puts every distinct tag in its
own AdamW group. ``lr=None`` keeps the base learning rate.
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from serengeti.ops.init import optim_tag

WEIGHT_DECAY_POLICIES = ("reference", "standard", "matrices")
DEFAULT_WEIGHT_DECAY_POLICY = "reference"  # the papers' code: every parameter decays unless tagged


def _default_decays(model: nn.Module, policy: str) -> dict[int, bool]:
    """id(param) -> whether it decays under ``policy`` (before ``_optim`` overrides)."""
    if policy not in WEIGHT_DECAY_POLICIES:
        raise ValueError(f"optimizer.weight_decay_policy must be one of {WEIGHT_DECAY_POLICIES}, got {policy!r}")
    decays: dict[int, bool] = {}
    for module in model.modules():
        for _, p in module.named_parameters(recurse=False):
            if policy == "reference":
                decays[id(p)] = True
            elif policy == "matrices":  # GPT-2 / nanoGPT: weights and embeddings (>= 2-D) decay, nothing else
                decays[id(p)] = p.ndim >= 2
            else:  # no decay on biases, norms and embeddings
                no_decay = p.ndim < 2 or isinstance(module, (nn.Embedding, nn.LayerNorm))
                decays[id(p)] = decays.get(id(p), True) and not no_decay
    return decays


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, policy: str = DEFAULT_WEIGHT_DECAY_POLICY) -> list[dict]:
    """Partition trainable parameters into AdamW groups.

    Every parameter lands in exactly one group. Parameters tagged with ``_optim`` (see
    :func:`set_optim`) take their lr / weight decay from the tag; the rest
    follow ``policy``: ``reference`` decays everything (the papers' code), ``standard`` exempts
    biases, norms and embeddings, ``matrices`` decays exactly the parameters with >= 2 dimensions
    (Linear weights and embeddings; the GPT-2 / nanoGPT convention). Each group carries a ``names`` list for logging and tests.
    """
    decays = _default_decays(model, policy)
    groups: "OrderedDict[tuple, dict]" = OrderedDict()
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        settings = {"lr": lr, "weight_decay": weight_decay if decays[id(p)] else 0.0}
        settings.update(optim_tag(p))
        key = tuple(sorted(settings.items()))
        group = groups.setdefault(key, {"params": [], "names": [], **settings})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, *, name: str = "adamw", lr: float, weight_decay: float = 0.0,
                    betas: Iterable[float] = (0.9, 0.999), eps: float = 1e-8,
                    weight_decay_policy: str = DEFAULT_WEIGHT_DECAY_POLICY) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` (config group ``optimizer``)."""
    if name != "adamw":
        raise ValueError(f"optimizer.name must be 'adamw', got {name!r}")
    groups = param_groups(model, lr=lr, weight_decay=weight_decay, policy=weight_decay_policy)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def _warmup(step: int, warmup_steps: int, init_ratio: float) -> float:
    return init_ratio + (1.0 - init_ratio) * step / max(1, warmup_steps)


def _warmup_then_decay(optimizer, decay, *, total_steps: int, warmup_steps: int, min_lr_ratio: float,
                       warmup_init_ratio: float) -> LambdaLR:
    """Linear warmup, then ``min_lr_ratio + (1 - min_lr_ratio) * decay(progress)``, progress 0 -> 1 at ``total_steps``."""
    _check_steps(total_steps, warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps, warmup_init_ratio)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * decay(progress)

    return LambdaLR(optimizer, factor)


def cosine_schedule(optimizer, *, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0,
                    warmup_init_ratio: float = 0.0) -> LambdaLR:
    """Linear warmup from ``warmup_init_ratio * lr`` to lr, then cosine to ``min_lr_ratio * lr`` at ``total_steps``."""
    return _warmup_then_decay(optimizer, lambda p: 0.5 * (1 + math.cos(math.pi * p)), total_steps=total_steps,
                              warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, warmup_init_ratio=warmup_init_ratio)


def linear_schedule(optimizer, *, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0,
                    warmup_init_ratio: float = 0.0) -> LambdaLR:
    """Linear warmup, then linear decay to ``min_lr_ratio * lr`` at ``total_steps`` (the H3 synthetics schedule)."""
    return _warmup_then_decay(optimizer, lambda p: 1.0 - p, total_steps=total_steps, warmup_steps=warmup_steps,
                              min_lr_ratio=min_lr_ratio, warmup_init_ratio=warmup_init_ratio)


def constant_schedule(optimizer, *, total_steps: int | None = None, warmup_steps: int = 0,
                      warmup_init_ratio: float = 0.0) -> LambdaLR:
    """Linear warmup, then constant lr."""
    return LambdaLR(optimizer, lambda step: _warmup(step, warmup_steps, warmup_init_ratio) if step < warmup_steps else 1.0)


SCHEDULES = {"cosine": cosine_schedule, "linear": linear_schedule, "constant": constant_schedule}


def build_scheduler(optimizer, *, name: str, total_steps: int, **kwargs) -> LambdaLR:
    """Scheduler by name (config group ``scheduler``)."""
    if name not in SCHEDULES:
        raise ValueError(f"scheduler.name must be one of {sorted(SCHEDULES)}, got {name!r}")
    return SCHEDULES[name](optimizer, total_steps=total_steps, **kwargs)


def _check_steps(total_steps: int, warmup_steps: int) -> None:
    if total_steps is None or total_steps <= 0:
        raise ValueError(f"scheduler needs a positive total number of steps (trainer.max_steps or scheduler.total_steps), got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"scheduler.warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps > total_steps:
        warnings.warn(f"scheduler.warmup_steps ({warmup_steps}) exceeds the total steps ({total_steps}): "
                      "the run ends inside the warmup", stacklevel=3)
