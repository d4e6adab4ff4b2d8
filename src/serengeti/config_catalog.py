"""The mixers the config directory offers, and the overrides that select each: one list for the
test suite and the benchmarks, read from ``configs/`` so that a new ``configs/model/mixer/<name>.yaml``
is tested and benchmarked without editing either. Training never uses this module.
"""
from __future__ import annotations

from pathlib import Path


def mixer_names(config_dir: str | Path) -> list[str]:
    """Every mixer, one per file of ``<config_dir>/model/mixer/`` (the one list tests and benchmarks use)."""
    return sorted(p.stem for p in (Path(config_dir) / "model" / "mixer").glob("*.yaml"))


def mixer_overrides(name: str, config_dir: str | Path) -> list[str]:
    """``train.yaml`` overrides that select mixer ``name``: its own model preset (``configs/model/<x>.yaml``
    whose defaults pick the mixer, hybrids aside), else the default backbone with ``model/mixer=<name>``."""
    import yaml

    for path in sorted((Path(config_dir) / "model").glob("*.yaml")):
        defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults", [])
        if not path.stem.startswith("hybrid") and {"mixer": name} in defaults:
            return [f"model={path.stem}"]
    return [f"model/mixer={name}"]
