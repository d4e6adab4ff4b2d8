"""Evaluate, sample or export a trained serengeti model.

    python evaluate.py ckpt=PATH [dataset=wikitext103 split=test]      # loss / perplexity / accuracy
    python evaluate.py task=generate ckpt=PATH prompt="..." max_new_tokens=64 temperature=0.8
    python evaluate.py task=export ckpt=PATH out=DIR                   # safetensors + config.json
    python evaluate.py task=lm_eval ckpt=PATH tasks=[lambada_openai,piqa]

Composes ``configs/evaluate.yaml`` and calls :func:`serengeti.evaluate.run.main`.
"""
from serengeti.runtime import run_hydra_entry, threads_from_config, use_passive_omp_wait

use_passive_omp_wait()  # before torch loads: idle OpenMP threads sleep instead of spinning

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    from serengeti.evaluate.run import main as run_main

    threads_from_config(cfg)  # torch threads: cfg.threads, or the CPUs this process may use
    return run_main(cfg)


if __name__ == "__main__":
    run_hydra_entry(main)  # Hydra's own errors (unknown key, unwritable run dir) in one line
