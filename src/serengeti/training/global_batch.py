"""Scale-out settings derived from the composed config: global batch -> gradient accumulation.

A run states the optimization the papers state, independent of the hardware::

    dataset.global_batch_size: 512   # sequences per optimizer step (tokens = 512 x dataset.seq_len)
    dataset.batch_size: 16           # sequences per device per forward/backward
    val_every_n_steps: 2000          # optional: validate every 2,000 optimizer steps

and at start-up ``trainer.accumulate_grad_batches = global / (world size x batch_size)`` with
world size = ``trainer.num_nodes x trainer.devices``; ``trainer.val_check_interval`` (which Lightning
counts in per-device batches) becomes ``val_every_n_steps x accumulate_grad_batches``. The same
file then trains on 1 GPU, 8 GPUs or 4 nodes with the same loss trajectory.
"""
from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, open_dict

from serengeti.errors import ConfigError

log = logging.getLogger("serengeti")


def devices_per_node(accelerator: Any, devices: Any) -> int:
    """Number of processes per node Lightning starts for ``trainer.devices`` (int, -1/"auto", "0,1", [0, 1])."""
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            return len([d for d in text.split(",") if d.strip()])
        devices = -1 if text in ("auto", "-1") else int(text)
    if not isinstance(devices, int):  # a list of device indices
        return len(list(devices))
    if devices == -1:
        accelerator = str(accelerator or "auto")
        if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
            return torch.cuda.device_count()
        return 1  # Lightning's CPU accelerator runs one process for devices="auto"
    return devices


def world_size(trainer_cfg: Any) -> int:
    """Total training processes: ``trainer.num_nodes x`` processes per node."""
    nodes = int(trainer_cfg.get("num_nodes") or 1)
    return nodes * devices_per_node(trainer_cfg.get("accelerator"), trainer_cfg.get("devices", "auto"))


def global_batch_plan(cfg: Any) -> dict[str, int]:
    """Trainer keys implied by ``dataset.global_batch_size`` (empty when it is null).

    Pure: reads the composed config, returns ``{"accumulate_grad_batches": a}`` plus
    ``{"val_check_interval": val_every_n_steps * a}`` when ``val_every_n_steps`` is set. Raises
    ``ValueError`` (message naming the keys) when the global batch does not split evenly, or when
    an explicit ``trainer.accumulate_grad_batches`` (other than 1) disagrees with it.
    """
    global_batch = cfg.dataset.get("global_batch_size")
    if global_batch is None:
        return {}
    per_device = int(cfg.dataset.batch_size)
    world = world_size(cfg.trainer)
    per_step = per_device * world
    if global_batch <= 0 or global_batch % per_step:
        raise ValueError(
            f"dataset.global_batch_size={global_batch} is not a positive multiple of dataset.batch_size={per_device} "
            f"x world size {world} (trainer.num_nodes x trainer.devices) = {per_step}")
    accumulate = global_batch // per_step
    configured = cfg.trainer.get("accumulate_grad_batches") or 1
    if configured not in (1, accumulate):
        raise ValueError(
            f"trainer.accumulate_grad_batches={configured} contradicts dataset.global_batch_size={global_batch} "
            f"(which implies {accumulate} at world size {world}); set only dataset.global_batch_size")
    plan = {"accumulate_grad_batches": accumulate}
    if cfg.get("val_every_n_steps"):
        plan["val_check_interval"] = int(cfg.val_every_n_steps) * accumulate
    return plan


def apply_global_batch(cfg: DictConfig) -> None:
    """Write :func:`global_batch_plan` into ``cfg.trainer`` (raises ``ConfigError`` on a bad split)."""
    try:
        plan = global_batch_plan(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not plan:
        return
    with open_dict(cfg):
        cfg.trainer.update(plan)
    accumulate = plan["accumulate_grad_batches"]
    # printed, not only logged: a smaller dataset.batch_size silently means more accumulation otherwise
    print(f"[serengeti] dataset.global_batch_size={cfg.dataset.global_batch_size} sequences "
          f"({cfg.dataset.global_batch_size * cfg.dataset.get('seq_len', 0):,} tokens) per optimizer step = "
          f"{world_size(cfg.trainer)} processes x dataset.batch_size={cfg.dataset.batch_size} x {accumulate} accumulated "
          f"batches (trainer.accumulate_grad_batches={accumulate})"
          + ("; dataset.global_batch_size=null steps after every batch" if accumulate > 1 else ""), flush=True)


class GlobalBatchLoss(pl.Callback):
    """Logs ``train/global_loss``: the mean training loss over one optimizer step's global batch.

    ``train/loss`` is the last micro-batch's loss; under gradient accumulation and data parallelism
    this averages the (equally sized) micro-batches of the step over accumulation and ranks, so it
    is the same number whatever the world size and accumulation that make up the global batch.
    """

    def __init__(self) -> None:
        self._sum, self._n, self._step = 0.0, 0, None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sum, self._n, self._step = 0.0, 0, trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        # Lightning returns the loss divided by accumulate_grad_batches; undo it to average micro-batches
        self._sum = self._sum + loss.detach().float() * trainer.accumulate_grad_batches
        self._n += 1
        if trainer.global_step != self._step:  # an optimizer step happened on this batch
            pl_module.log("train/global_loss", self._sum / self._n, on_step=True, on_epoch=False, sync_dist=True)
            self._sum, self._n, self._step = 0.0, 0, trainer.global_step


def fsdp_strategy(*, sharding_strategy: str = "FULL_SHARD", state_dict_type: str = "full",
                  activation_checkpointing: bool = False, **kwargs: Any):
    """Lightning's ``FSDPStrategy`` for the LM: one FSDP unit per residual :class:`~serengeti.models.backbone.Block`.

    Parameters, gradients and their reduction stay float32 (``MixedPrecision`` with float32 everywhere);
    with ``trainer.precision=bf16-mixed`` the matmuls still run in bf16 under autocast, exactly as in DDP.
    FSDP's own bf16 ``param_dtype`` would instead hand bf16 copies of S5's Lambda/B/C and the Hyena
    filter MLPs to the SSM and FFT kernels, which compute in float32 from whatever they are given.
    ``state_dict_type="full"`` gathers one ordinary ``.ckpt`` on rank 0 (what evaluate.py and resume
    read); ``"sharded"`` writes a directory per checkpoint, to be consolidated before evaluate.py
    (README.md, "Scaling out"). ``activation_checkpointing`` recomputes each block in the backward.
    """
    from pytorch_lightning.strategies import FSDPStrategy
    from torch.distributed.fsdp import MixedPrecision

    from serengeti.models.backbone import Block

    class _ClippingFSDPStrategy(FSDPStrategy):
        # Lightning's FSDP refuses trainer.gradient_clip_val (norm): clip through the root FSDP module,
        # which computes the norm over all shards
        def setup(self, trainer: pl.Trainer) -> None:
            super().setup(trainer)
            self.precision_plugin.clip_grad_by_norm = lambda optimizer, clip_val: self.model.clip_grad_norm_(clip_val)

    return _ClippingFSDPStrategy(
        auto_wrap_policy={Block},
        activation_checkpointing_policy={Block} if activation_checkpointing else None,
        mixed_precision=MixedPrecision(param_dtype=torch.float32, reduce_dtype=torch.float32, buffer_dtype=torch.float32),
        sharding_strategy=sharding_strategy, state_dict_type=state_dict_type, **kwargs)
