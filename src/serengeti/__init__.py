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
import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["LMHeadModel", "generate", "load_model", "load_tokenizer"]

from serengeti import config_resolvers as _config_resolvers  # noqa: F401  (${serengeti.*} for every config user)

_LAZY = {"LMHeadModel": "serengeti.models.backbone", "generate": "serengeti.models.generation", "load_model": "serengeti.models.pretrained"}


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer recorded by an exported directory or a ``.ckpt`` from ``train.py``.

    A :class:`~serengeti.data.tokenizers.BPETokenizer` (read from the export's ``tokenizer.json``
    when present) or :class:`~serengeti.data.tokenizers.CharTokenizer`; ``None`` for synthetic-task
    checkpoints, whose interface is token ids. Raises
    :class:`~serengeti.errors.CheckpointError` for a missing or unreadable checkpoint.
    """
    from serengeti.data.tokenizers import tokenizer_from_record
    from serengeti.io.checkpoint import read_checkpoint

    cfg, _ = read_checkpoint(path)
    return tokenizer_from_record(cfg.get("tokenizer"), path if Path(path).is_dir() else None)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'serengeti' has no attribute {name!r}")



class _RegisterWithTransformers(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Registers serengeti's model with ``transformers``' Auto classes (:mod:`serengeti.models.hf`) right after
    ``transformers`` itself is imported, so ``import serengeti`` stays light (no torch, no transformers:
    entry scripts set OpenMP variables before torch loads) and ``AutoModelForCausalLM`` knows
    ``model_type: serengeti`` in any process that imported serengeti, whichever was imported first."""

    def __init__(self) -> None:
        self.loader: Any = None

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # once; the real finders locate transformers
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        _register()

    @classmethod
    def install(cls) -> None:
        if "transformers" in sys.modules:
            _register()
        elif importlib.util.find_spec("transformers") is not None:
            sys.meta_path.insert(0, cls())


def _register() -> None:
    try:
        importlib.import_module("serengeti.models.hf")  # registers on import
    except Exception as e:  # a broken install must not break the user's own import of transformers
        import logging

        logging.getLogger(__name__).warning("serengeti: not registered with transformers (%s: %s)", type(e).__name__, e)


_RegisterWithTransformers.install()
