"""Weight initializers shared by the backbone and the mixers, and the optimizer tag a mixer puts on a
parameter that trains with its own learning rate or weight decay (read by :mod:`serengeti.training.optim`)."""
from __future__ import annotations

import math

import torch
from torch import nn

_TRUNC_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]


def lecun_normal_(weight: torch.Tensor, fan_in: int) -> torch.Tensor:
    """In place, Flax's ``lecun_normal``: a normal truncated at ±2σ', with σ' chosen so that the
    final std is exactly 1/sqrt(fan_in). Returns ``weight``."""
    std = 1.0 / math.sqrt(fan_in) / _TRUNC_STD
    return nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)


def set_optim(param: torch.nn.Parameter, *, lr: float | None = None, weight_decay: float | None = None) -> torch.nn.Parameter:
    """Tag ``param`` with its own lr and/or weight decay and return it."""
    opt = {}
    if lr is not None:
        opt["lr"] = float(lr)
    if weight_decay is not None:
        opt["weight_decay"] = float(weight_decay)
    param._optim = opt
    return param


def optim_tag(param: torch.nn.Parameter) -> dict[str, float]:
    """The ``lr`` / ``weight_decay`` that :func:`set_optim` gave ``param`` (empty when untagged)."""
    return getattr(param, "_optim", {})
