"""The LightningModule: causal-LM cross-entropy over any backbone built from a plain config dict."""
from __future__ import annotations

import logging
import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics

from serengeti.data.targets import IGNORE_INDEX
from serengeti.models.lm import LMHeadModel, build_model
from serengeti.optim import build_optimizer, build_scheduler

log = logging.getLogger("serengeti")


class _Mean(torchmetrics.Metric):
    """Token-weighted mean of a per-token quantity (sum / count), synced across ranks."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, total: torch.Tensor, count: torch.Tensor) -> None:
        self.total += total.detach().double()
        self.count += count.detach().double()

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp_min(1)


class LMTask(pl.LightningModule):
    """Causal language modelling on (inputs, targets) batches; targets == ``IGNORE_INDEX`` are ignored.

    Logs ``{train,val,test}/loss`` (mean CE per scored token), ``/perplexity`` (exp of it) and
    ``/accuracy`` (argmax accuracy over scored tokens — the last token in the synthetic test sets).

    Args:
        cfg: the plain, resolved run config (dicts only) with keys ``model``, ``optimizer``,
            ``scheduler`` and ``trainer``; stored in the checkpoint so the model can be rebuilt.
        model: an already built (e.g. loaded) LM to wrap instead of building one from ``cfg["model"]``
            (evaluate.py reuses this class's metrics on a loaded checkpoint).
    """

    def __init__(self, cfg: dict[str, Any], model: LMHeadModel | None = None) -> None:
        super().__init__()
        self.save_hyperparameters({"cfg": cfg})
        self.cfg = cfg
        self.model = model if model is not None else build_model(cfg["model"])
        self.metrics = torch.nn.ModuleDict(
            {f"{split}_{m}": _Mean() for split in ("val", "test") for m in ("loss", "accuracy")}
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def _loss(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs, targets = batch
        logits = self.model(inputs).float()
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        mask = targets != IGNORE_INDEX
        count = mask.sum()
        correct = ((logits.argmax(-1) == targets) & mask).sum()
        return ce, count, correct, ce / count.clamp_min(1)

    def on_train_epoch_start(self) -> None:
        """Re-sync the sampler's epoch to ``current_epoch`` before the epoch's iterator is made.

        Lightning sets it from its processed-epochs counter, which runs one ahead after resuming
        from a checkpoint written at the end of an epoch; resumed runs would see other batches.
        """
        loaders = self.trainer.train_dataloader
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
                if callable(getattr(sampler, "set_epoch", None)):
                    sampler.set_epoch(self.current_epoch)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        ce, count, correct, loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/accuracy", correct / count.clamp_min(1))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else 0.0)
        return loss

    def _eval_step(self, batch, split: str) -> None:
        ce, count, correct, _ = self._loss(batch)
        self.metrics[f"{split}_loss"].update(ce, count)
        self.metrics[f"{split}_accuracy"].update(correct.to(ce.dtype), count)

    def _eval_epoch_end(self, split: str) -> None:
        loss = self.metrics[f"{split}_loss"].compute()
        acc = self.metrics[f"{split}_accuracy"].compute()
        self.log_dict({f"{split}/loss": loss.float(), f"{split}/perplexity": torch.exp(loss.clamp(max=80)).float(),
                       f"{split}/accuracy": acc.float()}, prog_bar=split == "val", sync_dist=False)
        self.metrics[f"{split}_loss"].reset()
        self.metrics[f"{split}_accuracy"].reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        opt_cfg = dict(self.cfg["optimizer"])
        optimizer = build_optimizer(self.model, **opt_cfg)
        for g in optimizer.param_groups:  # the groups the run trains with, as built
            log.info("param group lr=%g wd=%g: %d tensors, %d parameters", g["lr"], g["weight_decay"], len(g["params"]),
                     sum(p.numel() for p in g["params"]))
        sched_cfg = dict(self.cfg.get("scheduler") or {"name": "constant"})
        # serengeti.run_config fills total_steps from trainer.max_steps; only a run bounded by epochs
        # (max_steps = -1) leaves it null and takes Lightning's estimate of its optimizer steps
        total = sched_cfg.pop("total_steps", None) or self.trainer.estimated_stepping_batches
        if total is None or not math.isfinite(total):
            raise ValueError("set trainer.max_steps or scheduler.total_steps: the schedule needs a finite length")
        scheduler = build_scheduler(optimizer, total_steps=int(total), **sched_cfg)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
