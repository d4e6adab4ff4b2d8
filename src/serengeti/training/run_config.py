"""The keys of a run config that its dataset decides, filled in one place.

A composed config leaves these keys null for the data to decide:

* ``model.vocab_size``: the dataset's vocabulary (a larger value is kept, e.g. to pad the embedding;
  a smaller one is an error);
* ``model.l_max``: the dataset's longest input (``dataset.seq_len`` for the text sets, plus the
  query tokens for the synthetic tasks);
* ``scheduler.total_steps``: ``trainer.max_steps`` when that is set (> 0), so the schedule spans the
  configured run and not a debug cut such as ``trainer.limit_train_batches``.

Interpolations such as ``max_position_embeddings: ${model.l_max}`` resolve after the fill. Training
(:func:`serengeti.training.run.prepare`), the benchmarks and the tests all go through :func:`fill_from_dataset`
and :func:`model_config`; evaluation and conversion read configs that were filled when they were written.
"""
from __future__ import annotations

import copy
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from serengeti.errors import ConfigError


def fill_from_dataset(cfg: DictConfig, *, vocab_size: int, l_max: int | None) -> DictConfig:
    """A copy of the composed run config ``cfg`` with the dataset-decided keys filled (``cfg`` is unchanged).

    Raises:
        ConfigError: ``model.vocab_size`` is set below the dataset's ``vocab_size``.
    """
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        if cfg.model.get("vocab_size") is None:
            cfg.model.vocab_size = int(vocab_size)
        elif cfg.model.vocab_size < vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the dataset's vocabulary ({vocab_size})")
        if cfg.model.get("l_max") is None:
            cfg.model.l_max = l_max
        scheduler, max_steps = cfg.get("scheduler"), cfg.get("trainer", {}).get("max_steps", -1)
        if scheduler is not None and scheduler.get("total_steps") is None and max_steps is not None and max_steps > 0:
            scheduler.total_steps = max_steps
    return cfg


def model_config(cfg: DictConfig, *, vocab_size: int, l_max: int | None) -> dict[str, Any]:
    """The plain, resolved ``model`` config of ``cfg`` after :func:`fill_from_dataset`: what
    :func:`serengeti.models.backbone.build_model` takes."""
    return OmegaConf.to_container(fill_from_dataset(cfg, vocab_size=vocab_size, l_max=l_max).model, resolve=True)


FINAL_OVERRIDES = "final_overrides"


def command_line_keys() -> set[str]:
    """Dotted keys the command line set (``trainer.max_steps=5``, ``+dataset.x=1``), from Hydra's record of
    this run; empty outside a Hydra run. Config-group choices (``size=tiny``) are included and harmless."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    overrides = HydraConfig.get().overrides.task
    return {str(o).split("=", 1)[0].lstrip("+~") for o in overrides if "=" in str(o)}


def apply_final_overrides(cfg: DictConfig, keep: set[str] | None = None) -> list[str]:
    """Merge ``cfg.final_overrides`` (a preset such as ``size=tiny``) over ``cfg`` in place, then drop it.

    A preset composes before an experiment's own keys (Hydra's order), so a recipe would override it;
    merging its ``final_overrides`` at start-up lets it win instead. Keys in ``keep`` (default: those
    set on the command line, :func:`command_line_keys`) keep their value. Returns the keys changed.
    """
    final = cfg.get(FINAL_OVERRIDES)
    if final is None:
        return []
    keep = command_line_keys() if keep is None else keep
    changed = []
    with open_dict(cfg):
        leaves = OmegaConf.to_container(final, resolve=False)
        for key, value in _leaves(leaves):
            if key in keep:
                continue
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
            changed.append(key)
        del cfg[FINAL_OVERRIDES]
    return changed


def _leaves(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out += _leaves(v, key + ".") if isinstance(v, dict) and v else [(key, v)]
    return out
