"""What happens when a loss or gradient is NaN/inf (``trainer.nan_policy``).

The check runs after backward and before the optimizer applies the update (Lightning's
``on_before_optimizer_step``), on the global gradient norm, which a non-finite loss or any
non-finite gradient makes non-finite. Under DDP the gradients are already all-reduced, so every
rank decides alike.

* ``stop`` (default): raise :class:`NonFiniteError` naming the step; the update is not applied and
  no checkpoint is written, so the last checkpoint on disk stays the last finite one.
* ``skip``: drop this step's gradients (the optimizer leaves parameters and moments untouched; the
  schedule still advances), count it in ``train/nonfinite_skipped`` and go on.
"""
from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch

log = logging.getLogger("serengeti")

POLICIES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient with ``trainer.nan_policy=stop``."""


class NonFiniteGuard(pl.Callback):
    def __init__(self, policy: str = "stop") -> None:
        if policy not in POLICIES:
            raise ValueError(f"trainer.nan_policy must be one of {list(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.skipped = 0

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if bool(torch.isfinite(norm)):
            return
        for p in params:
            p.grad = None  # torch optimizers skip parameters without a gradient
        loss = trainer.callback_metrics.get("train/loss")
        what = f"step {trainer.global_step + 1}: gradient norm {norm.item()}" + (
            f", last logged train/loss {float(loss):.4g}" if loss is not None else "")
        if self.policy == "stop":
            raise NonFiniteError(f"non-finite loss or gradient at {what}; stopped (trainer.nan_policy=stop) "
                                 "without applying the update: the checkpoints on disk are from earlier, finite steps")
        self.skipped += 1
        log.warning("non-finite loss or gradient at %s: step skipped (%d so far)", what, self.skipped)
        pl_module.log("train/nonfinite_skipped", float(self.skipped))

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
