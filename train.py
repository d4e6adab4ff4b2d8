"""Train a serengeti model: ``python train.py experiment=wikitext/hyena [key=value ...]``.

Composes ``configs/train.yaml`` and calls :func:`serengeti.training.run.main`; returns the monitored
metric so Hydra sweepers can optimise it.
"""
from serengeti.runtime import run_hydra_entry, threads_from_config, use_passive_omp_wait

use_passive_omp_wait()  # before torch loads: idle OpenMP threads sleep instead of spinning

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from serengeti.training.run import main as run_main

    threads_from_config(cfg)  # torch threads: cfg.threads, or chosen from tokens x d_model^2 per step
    return run_main(cfg)


if __name__ == "__main__":
    run_hydra_entry(main)  # Hydra's own errors (unknown key, unwritable run dir) in one line
