"""Loss / perplexity / accuracy of a loaded model on a configured dataset.

The numbers come from :class:`~serengeti.training.lm_task.LMTask`'s own validation/test loop (same loss,
same token-weighted float64 accumulation), so they equal what training logged for the same
weights and data.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

from serengeti.errors import EvalError

if TYPE_CHECKING:  # Lightning is imported only when an evaluation runs (generate/export stay light)
    import pytorch_lightning as pl

SPLITS = ("val", "test")


def build_datamodule(dataset_cfg: Mapping[str, Any], batch_size: int | None = None) -> pl.LightningDataModule:
    """Build a (plain, resolved) ``dataset`` config; ``batch_size`` overrides the evaluation batch size.

    The config may come from a checkpoint, so it is built through :func:`serengeti.registry.build`:
    a registered datamodule with plain options only (an unknown ``_target_`` is refused, naming it).
    """
    import serengeti.data  # noqa: F401  (registers the datamodules)
    from serengeti.errors import UnsafeConfigError
    from serengeti.registry import DATASETS, build

    cfg = dict(dataset_cfg)
    if batch_size is not None:  # checked by evaluate.run.check_settings (an integer >= 1)
        cfg["batch_size"] = batch_size
        if "batch_size_eval" in cfg:
            cfg["batch_size_eval"] = batch_size
    try:
        return build(cfg, DATASETS, "dataset")
    except UnsafeConfigError as e:
        raise EvalError(str(e)) from e
    except Exception as e:  # the datamodule's own message names its key
        raise EvalError(str(e) if str(e).startswith("dataset") else f"dataset: {e}") from e


def check_position_buckets(value: Any) -> list[int] | None:
    """:func:`serengeti.training.lm_task.check_position_buckets` with its error as an :class:`EvalError`, so that
    evaluate.py can refuse a bad ``position_buckets`` before loading the model."""
    from serengeti.training.lm_task import check_position_buckets as check

    try:
        return check(value)
    except ValueError as e:
        raise EvalError(str(e)) from None


def check_compatible(datamodule, ckpt_cfg: Mapping[str, Any], limit: tuple[int, str] | None = None) -> None:
    """Raise :class:`EvalError` if the dataset's vocabulary or length does not fit the checkpoint.

    ``limit``: ``(longest input, why)`` of the loaded model (``LMHeadModel.length_limit()``; ``None`` =
    any length, so a length-independent model can be scored beyond its training length).
    """
    model_cfg = ckpt_cfg["model"]
    record = ckpt_cfg.get("tokenizer") or {}
    vocab = int(datamodule.vocab_size)
    tok = getattr(datamodule, "tokenizer", None)
    tok_name = f" (dataset.tokenizer={getattr(tok, 'name', '?')!r})" if tok is not None else ""
    if record.get("vocab_size") is not None and vocab != record["vocab_size"]:
        raise EvalError(f"the dataset's vocabulary has {vocab} ids{tok_name}, the checkpoint was trained on "
                        f"{record['vocab_size']} ({record.get('kind')} tokenizer): pick a dataset with the same tokenizer")
    if vocab > model_cfg["vocab_size"]:
        raise EvalError(f"the dataset's vocabulary has {vocab} ids{tok_name}, more than the checkpoint's "
                        f"model.vocab_size={model_cfg['vocab_size']}")
    if record.get("kind") == "char" and getattr(tok, "fingerprint", None) != record.get("fingerprint"):
        raise EvalError("the dataset's character vocabulary differs from the checkpoint's (same size, other "
                        "characters): ids would mean other characters")
    data_len = getattr(datamodule, "l_max", None)
    if limit is not None and data_len is not None and data_len > limit[0]:
        raise EvalError(f"dataset sequences have {data_len} positions, more than the model's maximum sequence length "
                        f"{limit[0]}: {limit[1]}; lower dataset.seq_len")


def _trainer(device: str, precision: str) -> pl.Trainer:
    import pytorch_lightning as pl

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    accel = "gpu" if dev.type == "cuda" else dev.type
    devices = [dev.index] if dev.type == "cuda" and dev.index is not None else 1
    from serengeti.training.callbacks.progress import progress_bar

    # a rich bar on a terminal, a plain line every 20 s in a log file (a long split takes minutes)
    return pl.Trainer(accelerator=accel, devices=devices, precision=precision, logger=False, enable_checkpointing=False,
                      callbacks=[progress_bar()], enable_model_summary=False)


def evaluate_model(model: torch.nn.Module, ckpt_cfg: Mapping[str, Any], datamodule, *, split: str = "val",
                   device: str = "auto", precision: str = "32-true",
                   position_buckets: list[int] | None = None) -> dict[str, float]:
    """``{"<split>/loss", "<split>/perplexity", "<split>/accuracy"}`` of ``model`` on ``datamodule``.

    Args:
        model: the :class:`~serengeti.models.backbone.LMHeadModel` (eval mode is set by Lightning). ckpt_cfg: its plain config (``model`` etc.).
        datamodule: built from a ``dataset`` config. split: ``val`` or ``test``.
        position_buckets: increasing boundaries ``[b1, ..., bk]``; adds ``<split>/loss_pos_0_b1``, ...,
            ``<split>/loss_pos_bk_end``: the mean loss over the scored targets at those positions of
            the window (:class:`~serengeti.training.lm_task.LMTask`; buckets without scored targets are left out).
    """
    if split not in SPLITS:
        raise EvalError(f"split={split!r} must be one of {SPLITS}")
    from serengeti.training.lm_task import LMTask

    check_compatible(datamodule, ckpt_cfg, model.length_limit())
    task = LMTask(dict(ckpt_cfg), model=model, position_buckets=check_position_buckets(position_buckets))
    trainer = _trainer(device, precision)
    run = trainer.validate if split == "val" else trainer.test
    roles = getattr(datamodule, "roles", None)
    if roles is not None and roles.get(split) is None:
        raise EvalError(f"the dataset has no {split} split (dataset.{split}_split is null)")
    results = run(task, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in results[0].items()}
