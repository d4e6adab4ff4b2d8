"""Refuse a GPU trainer on a machine without CUDA before anything is built or written; pick an evaluation device."""
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


def usable_device(device: str | None) -> str:
    """``device`` for evaluation tools, falling back to the CPU where CUDA is missing.

    ``None`` / ``"auto"``: CUDA when available, else the CPU (as ``evaluate.py device=auto``). A CUDA
    device on a machine without CUDA (``lm_eval --device cuda``, its default) becomes ``"cpu"`` with a
    warning instead of torch's "Torch not compiled with CUDA enabled" in the middle of a run.
    """
    import logging

    if device is None or str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(str(device)).type == "cuda" and not torch.cuda.is_available():
        logging.getLogger("serengeti").warning("device=%s: CUDA is not available here; using the CPU", device)
        return "cpu"
    return str(device)
