"""Logger factories whose defaults never block a run; ``logger=[csv,wandb]`` combines them (README.md)."""
from __future__ import annotations

import netrc
import os


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_logger(*, offline: bool | None = None, **kwargs):
    """A ``WandbLogger`` that runs offline unless an API key is available (never prompts).

    Args:
        offline: force offline (True) or online (False); None decides from ``WANDB_API_KEY``/netrc.
        kwargs: passed to :class:`pytorch_lightning.loggers.WandbLogger` (project, name, save_dir, ...).
    """
    from pytorch_lightning.loggers import WandbLogger

    if offline is None:
        offline = not _wandb_logged_in()
    os.environ.setdefault("WANDB_SILENT", "true")
    kwargs["name"] = run_name(kwargs.get("name"), kwargs.get("save_dir"))
    if offline:
        os.environ["WANDB_MODE"] = "offline"
        where = os.path.join(str(kwargs.get("save_dir") or "."), "wandb", "offline-run-*")
        print(f"[serengeti] wandb logs offline (no WANDB_API_KEY or wandb login): upload the run afterwards with "
              f"`wandb sync {where}`", flush=True)
    return WandbLogger(offline=offline, **kwargs)


def run_name(name: str | None, save_dir: str | None = None, max_chars: int = 120) -> str:
    """A wandb run name that tells runs apart: ``name`` plus this run's command-line overrides
    (``train optimizer.lr=1e-3 seed=2``), or plus the run directory's name outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    base = name or "serengeti"
    if HydraConfig.initialized():
        overrides = [str(o) for o in HydraConfig.get().overrides.task if not str(o).startswith(("hydra.", "paths."))]
        label = " ".join(overrides)
    else:
        label = os.path.basename(os.path.normpath(str(save_dir))) if save_dir else ""
    return f"{base} {label}".strip()[:max_chars]
