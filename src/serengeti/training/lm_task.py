"""The LightningModule: causal-LM cross-entropy over any backbone built from a plain config dict."""
from __future__ import annotations

import logging
import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics

from serengeti.data.samplers import loader_samplers
from serengeti.data.targets import IGNORE_INDEX
from serengeti.models.backbone import LMHeadModel, build_model
from serengeti.training.optim import build_optimizer, build_scheduler

log = logging.getLogger("serengeti")


class _Mean(torchmetrics.Metric):
    """Token-weighted mean of a per-token quantity (sum / count), synced across ranks.

    ``size``: ``()`` for one mean, ``(K,)`` for K means kept side by side (``total`` and ``count``
    then have shape ``(K,)``, and so does :meth:`compute`).
    """

    full_state_update = False

    def __init__(self, size: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.add_state("total", torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, total: torch.Tensor, count: torch.Tensor) -> None:
        self.total += total.detach().double()
        self.count += count.detach().double()

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp_min(1)


class _Sums(_Mean):
    """A :class:`_Mean` whose :meth:`compute` returns the synced ``(total, count)``, so empty entries can be told apart."""

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.total, self.count


def check_position_buckets(value: Any) -> list[int] | None:
    """``value`` (a list or an OmegaConf list) as a plain list of ints, or ``None``; ``ValueError`` unless it
    is null or a non-empty list of increasing positive integers (boundaries of positions in the window)."""
    if value is None:
        return None
    from omegaconf import OmegaConf

    shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    ok = isinstance(shown, (list, tuple)) and len(shown) > 0 \
        and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in shown) \
        and all(a < b for a, b in zip(shown, shown[1:]))
    if not ok:
        raise ValueError(f"position_buckets={shown!r}: expected a list of increasing positive integers, "
                         "e.g. [8,32,128] (or null)")
    return list(shown)


def position_bucket_names(buckets: list[int]) -> list[str]:
    """``[8, 32]`` -> ``["0_8", "8_32", "32_end"]``: the suffixes of the ``<split>/loss_pos_*`` metrics."""
    edges = [0, *buckets]
    return [f"{a}_{b}" for a, b in zip(edges, edges[1:])] + [f"{edges[-1]}_end"]


def position_loss_sums(token_ce: torch.Tensor, mask: torch.Tensor, buckets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and scored-target count per bucket of positions in the window.

    Args:
        token_ce: ``(B, L)`` per-target cross-entropy. mask: ``(B, L)`` bool, True where the target is scored.
        buckets: increasing positive boundaries ``[b1, ..., bk]``; bucket ``j`` holds the positions
            ``t`` (target index in the window, 0 = predicted from one input token) with
            ``edges[j] <= t < edges[j + 1]``, ``edges = [0, b1, ..., bk, inf]``.

    Returns:
        ``(total, count)``, each ``(k + 1,)`` float64.
    """
    L = token_ce.shape[1]
    per_pos = torch.where(mask, token_ce.double(), 0.0).sum(0)  # (L,)
    per_pos_count = mask.sum(0).double()  # (L,)
    bucket = torch.bucketize(torch.arange(L, device=token_ce.device),
                             torch.tensor(buckets, device=token_ce.device), right=True)  # (L,) in [0, k]
    zeros = torch.zeros(len(buckets) + 1, dtype=torch.float64, device=token_ce.device)
    return zeros.index_add(0, bucket, per_pos), zeros.index_add(0, bucket, per_pos_count)


class LMTask(pl.LightningModule):
    """Causal language modelling on (inputs, targets) batches; targets == ``IGNORE_INDEX`` are ignored.

    Logs ``{train,val,test}/loss`` (mean CE per scored token), ``/perplexity`` (exp of it) and
    ``/accuracy`` (argmax accuracy over scored tokens — the last token in the synthetic test sets).

    Args:
        cfg: the plain, resolved run config (dicts only) with keys ``model``, ``optimizer``,
            ``scheduler`` and ``trainer``; stored in the checkpoint so the model can be rebuilt.
        model: an already built (e.g. loaded) LM to wrap instead of building one from ``cfg["model"]``
            (evaluate.py reuses this class's metrics on a loaded checkpoint).
        position_buckets: increasing positive boundaries ``[b1, ..., bk]`` of target positions in
            the window (see :func:`position_loss_sums`); validation/test then also log the loss per
            bucket, ``{val,test}/loss_pos_0_b1``, ..., ``/loss_pos_bk_end``, leaving out buckets
            with no scored target. ``None`` (the default, training): not computed.
    """

    def __init__(self, cfg: dict[str, Any], model: LMHeadModel | None = None,
                 position_buckets: list[int] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters({"cfg": cfg})
        self.cfg = cfg
        self.model = model if model is not None else build_model(cfg["model"])
        self.metrics = torch.nn.ModuleDict(
            {f"{split}_{m}": _Mean() for split in ("val", "test") for m in ("loss", "accuracy")}
        )
        self.position_buckets = check_position_buckets(position_buckets)
        if self.position_buckets is not None:
            for split in ("val", "test"):
                self.metrics[f"{split}_loss_pos"] = _Sums((len(self.position_buckets) + 1,))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def _loss(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs, targets = batch
        return self._score(self.model(inputs).float(), targets)

    @staticmethod
    def _score(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``logits`` ``(B, L, V)`` float, ``targets`` ``(B, L)`` -> summed CE, scored count, correct count, mean CE."""
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
        for sampler in loader_samplers(self.trainer.train_dataloader):
            if callable(getattr(sampler, "set_epoch", None)):
                sampler.set_epoch(self.current_epoch)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        ce, count, correct, loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/accuracy", correct / count.clamp_min(1))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else 0.0)
        return loss

    def _eval_step(self, batch, split: str) -> None:
        inputs, targets = batch
        logits = self.model(inputs).float()
        ce, count, correct, _ = self._score(logits, targets)
        self.metrics[f"{split}_loss"].update(ce, count)
        self.metrics[f"{split}_accuracy"].update(correct.to(ce.dtype), count)
        if self.position_buckets is not None:
            token_ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="none").view_as(targets)
            self.metrics[f"{split}_loss_pos"].update(
                *position_loss_sums(token_ce, targets != IGNORE_INDEX, self.position_buckets))

    def _eval_epoch_end(self, split: str) -> None:
        loss = self.metrics[f"{split}_loss"].compute()
        acc = self.metrics[f"{split}_accuracy"].compute()
        logged = {f"{split}/loss": loss.float(), f"{split}/perplexity": torch.exp(loss.clamp(max=80)).float(),
                  f"{split}/accuracy": acc.float()}
        if self.position_buckets is not None:
            totals, counts = self.metrics[f"{split}_loss_pos"].compute()
            for name, total, n in zip(position_bucket_names(self.position_buckets), totals, counts):
                if n > 0:  # a bucket without scored targets (e.g. past the window's end) is left out
                    logged[f"{split}/loss_pos_{name}"] = (total / n).float()
            self.metrics[f"{split}_loss_pos"].reset()
        self.log_dict(logged, prog_bar=split == "val", sync_dist=False)
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
        # serengeti.training.run_config fills total_steps from trainer.max_steps; only a run bounded by epochs
        # (max_steps = -1) leaves it null and takes Lightning's estimate of its optimizer steps
        total = sched_cfg.pop("total_steps", None) or self.trainer.estimated_stepping_batches
        if total is None or not math.isfinite(total):
            raise ValueError("set trainer.max_steps or scheduler.total_steps: the schedule needs a finite length")
        scheduler = build_scheduler(optimizer, total_steps=int(total), **sched_cfg)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
