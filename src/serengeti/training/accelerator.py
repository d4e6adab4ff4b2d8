"""Refuse a GPU trainer on a machine without CUDA before anything is built or written."""
from __future__ import annotations

from typing import Any, Mapping

import torch

GPU_ACCELERATORS = ("gpu", "cuda")


def cuda_problem(trainer_cfg: Mapping[str, Any] | None) -> str | None:
    """Why ``trainer_cfg`` cannot run here, or ``None`` when it can.

    A trainer asking for ``accelerator: gpu`` / ``cuda`` (``trainer=gpu``, ``trainer=ddp``) needs a
    CUDA device; without one Lightning would fail only after the run directory, the data and the
    model exist. The message names the key and the CPU alternatives.
    """
    accelerator = str((trainer_cfg or {}).get("accelerator") or "auto").lower()
    if accelerator not in GPU_ACCELERATORS or torch.cuda.is_available():
        return None
    build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (f"trainer.accelerator={accelerator} needs a CUDA GPU, and none is available (torch {torch.__version__}, "
            f"{build}): use trainer=cpu, or trainer=ddp_sim for DDP on 2 CPU processes")
