"""Training-step time at 1 thread, 2 threads and the automatic thread count, interleaved in one process.

    python benchmarks/threads.py                                  # default run, Shakespeare, a 125M-shape step
    python benchmarks/threads.py --case default --repeats 9
    python benchmarks/threads.py --case 125m --extra dataset.seq_len=512 model.n_layer=1

A case is a set of ``train.yaml`` overrides. Its LM is built as training builds it
(:func:`serengeti.training.run_config.model_config`), fed random token batches of the dataset's shape
(``dataset.batch_size`` × ``dataset.seq_len``), and one timed step is forward, cross-entropy,
backward and an AdamW step. The thread counts of a case alternate step by step
(``torch.set_num_threads`` between steps), so load changes on a shared machine hit each count alike;
each entry is the median over repeats. Printed per case: the work ``tokens per step × d_model²`` that
:func:`serengeti.runtime.auto_threads` decides from, its choice, the times and the ratios, with the
machine's load average.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the entry scripts (serengeti.runtime)

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from serengeti.models.backbone import build_model  # noqa: E402
from serengeti.training.run_config import model_config  # noqa: E402
from serengeti.runtime import auto_threads, available_cpus, step_work  # noqa: E402

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
#: name -> (overrides, vocabulary the dataset would give)
CASES = {
    "default": ([], 10),  # python train.py: associative recall, vocab 10
    "shakespeare": (["experiment=shakespeare_char/hyena"], 65),  # the character vocabulary
    # the 125M Hyena-S5 shape (d_model 768, context 1024, GPT-2 vocabulary) at 2 of its layers and batch 1
    "125m": (["experiment=pile/hyena_s5", "model.n_layer=2", "dataset.batch_size=1"], 50257),
}


def load() -> str:
    return "load {:.2f}/{:.2f}/{:.2f}".format(*os.getloadavg())


def build(overrides: list[str], vocab: int):
    """(model, batch of token ids, cfg) for a case."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    B, L = cfg.dataset.batch_size, cfg.dataset.seq_len
    torch.manual_seed(0)
    model = build_model(model_config(cfg, vocab_size=vocab, l_max=L)).train()
    tokens = torch.randint(0, vocab, (B, L + 1))
    return model, tokens, cfg


def time_step(model, opt, tokens) -> float:
    t0 = time.perf_counter()
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--extra", nargs="*", default=[], help="overrides added to every case, e.g. dataset.seq_len=512")
    args = p.parse_args()
    cpus = available_cpus()
    print(f"torch {torch.__version__}, {cpus} CPUs, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} ({load()})")
    for name in args.case:
        overrides, vocab = CASES[name]
        model, tokens, cfg = build(overrides + args.extra, vocab)
        work = step_work(cfg)
        auto = auto_threads(work, cpus)
        counts = sorted({1, cpus})
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for t in counts:  # warm-up at each count
            torch.set_num_threads(t)
            time_step(model, opt, tokens)
        times = {t: [] for t in counts}
        for _ in range(args.repeats):
            for t in counts:
                torch.set_num_threads(t)
                times[t].append(time_step(model, opt, tokens))
        med = {t: statistics.median(v) for t, v in times.items()}
        best = min(med.values())
        print(f"{' '.join([name] + args.extra)}: tokens × d_model² = {work:,} -> automatic {auto} thread(s); "
              + ", ".join(f"{t} thread(s) {1e3 * med[t]:.1f} ms" for t in counts)
              + f"; automatic / faster = {med[auto] / best:.2f}; 1 / {cpus} threads = {med[1] / med[cpus]:.2f} "
              f"(median of {args.repeats}, interleaved) ({load()})", flush=True)


if __name__ == "__main__":
    main()
