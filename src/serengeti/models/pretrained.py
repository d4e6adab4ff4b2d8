"""A trained model as a bundle: weights, config and tokenizer, loaded or exported in one call.

Built on :meth:`~serengeti.models.backbone.LMHeadModel.from_pretrained` (weights and config) and
the tokenizer records of :mod:`serengeti.data.tokenizers`; the file format is :mod:`serengeti.io.checkpoint`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from serengeti.data.tokenizers import recorded_tokenizer, tokenizer_from_record
from serengeti.io.checkpoint import check_export_target, save_pretrained
from serengeti.models.backbone import LMHeadModel


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu", tokenizer: Any = None,
               load_tokenizer: bool = True) -> tuple[LMHeadModel, dict, Any]:
    """Load a model for evaluation or generation.

    Args:
        path: a ``.ckpt`` from ``train.py`` or an exported directory.
        device: where the model goes.
        tokenizer: optional tokenizer spec (as ``dataset.tokenizer``) to use instead of the recorded one.
        load_tokenizer: ``False`` skips rebuilding the tokenizer (returns ``None``).

    Returns:
        ``(model, cfg, tokenizer)``: the LM in eval mode; the plain config (``model`` and, when
        recorded, ``dataset`` and ``tokenizer``); a :class:`~serengeti.data.tokenizers.BPETokenizer` /
        :class:`~serengeti.data.tokenizers.CharTokenizer`, or ``None`` when the checkpoint records no
        text tokenizer (synthetic tasks: token ids are the interface).
    """
    model = LMHeadModel.from_pretrained(path, device=device)
    cfg = model.pretrained_config
    tok = None
    if load_tokenizer:
        root = path if Path(path).is_dir() else None
        tok = tokenizer_from_record(cfg.get("tokenizer"), root, override=tokenizer)
    return model, cfg, tok


def export(ckpt: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """``.ckpt`` (or exported directory) -> safetensors directory ``out``; returns ``out``.

    The tokenizer is copied in when it can be loaded; if not, a warning is logged and the record
    alone is kept (text in and out of the export then needs ``tokenizer=<local tokenizer>``: an export's
    record is never looked up by name).
    """
    check_export_target(out, overwrite=overwrite, inputs={"ckpt": ckpt})  # before any work
    model, cfg, _ = load_model(ckpt, load_tokenizer=False)
    tok = recorded_tokenizer(cfg, ckpt if Path(ckpt).is_dir() else None)
    return save_pretrained(model, cfg, out, tokenizer=tok, overwrite=overwrite, inputs={"ckpt": ckpt})
