"""Weight initializers shared by the backbone and the mixers."""
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
