"""Logger factories whose defaults never block a run."""
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
    if offline:
        os.environ["WANDB_MODE"] = "offline"
    return WandbLogger(offline=offline, **kwargs)
