"""Per-parameter optimizer overrides, declared where a parameter is created.

A parameter tagged with ``set_optim(p, lr=..., weight_decay=...)`` carries
``p._optim = {"lr": ..., "weight_decay": ...}``; ``serengeti.optim.param_groups`` puts every
distinct override in its own AdamW group. ``lr=None`` keeps the base learning rate.
"""
from __future__ import annotations

import torch


def set_optim(param: torch.nn.Parameter, *, lr: float | None = None, weight_decay: float | None = None) -> torch.nn.Parameter:
    """Tag ``param`` with its own lr and/or weight decay and return it."""
    opt = {}
    if lr is not None:
        opt["lr"] = float(lr)
    if weight_decay is not None:
        opt["weight_decay"] = float(weight_decay)
    param._optim = opt
    return param
