"""serengeti: long-sequence language models (Transformer, H3, Hyena, Hyena-S5, long convolutions).

Loading an exported model (``python evaluate.py task=export ...``) the Hugging Face way::

    from serengeti import LMHeadModel, generate, load_tokenizer
    model = LMHeadModel.from_pretrained("exports/my_model")
    tokenizer = load_tokenizer("exports/my_model")
    ids = torch.tensor([tokenizer.encode_batch(["The meaning of life is"])[0]])
    print(tokenizer.decode(generate(model, ids, 32, temperature=0.0).tokens[0].tolist()))

The names below are imported on first use, so ``import serengeti.mixers`` stays light.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

__all__ = ["LMHeadModel", "generate", "load_model", "load_tokenizer"]

from serengeti import config_resolvers as _config_resolvers  # noqa: F401  (${serengeti.*} for every config user)

_LAZY = {"LMHeadModel": "serengeti.models.lm", "generate": "serengeti.generation", "load_model": "serengeti.checkpoint"}


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer recorded by an exported directory or a ``.ckpt`` from ``train.py``.

    A :class:`~serengeti.data.tokenizers.BPETokenizer` (read from the export's ``tokenizer.json``
    when present) or :class:`~serengeti.data.tokenizers.CharTokenizer`; ``None`` for synthetic-task
    checkpoints, whose interface is token ids. Raises
    :class:`~serengeti.checkpoint.CheckpointError` for a missing or unreadable checkpoint.
    """
    from serengeti.checkpoint import read_checkpoint, tokenizer_from_record

    cfg, _ = read_checkpoint(path)
    return tokenizer_from_record(cfg.get("tokenizer"), path if Path(path).is_dir() else None)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'serengeti' has no attribute {name!r}")


def _register_with_transformers() -> None:
    """``AutoConfig`` / ``AutoModelForCausalLM`` learn ``model_type: serengeti`` (:mod:`serengeti.models.hf`)
    when ``transformers`` is installed."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return
    import serengeti.models.hf  # noqa: F401  (registers on import)


_register_with_transformers()
