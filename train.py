"""Train a serengeti model: ``python train.py experiment=wikitext/hyena [key=value ...]``.

Composes ``configs/train.yaml`` and calls :func:`serengeti.train.main`; returns the monitored
metric so Hydra sweepers can optimise it.
"""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from serengeti.train import main as run_main

    return run_main(cfg)


if __name__ == "__main__":
    main()
