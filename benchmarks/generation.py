"""Per-token generation latency vs context length: KV-cache Transformer vs H3, Hyena-S5, Hyena.

    python benchmarks/generation.py                         # contexts 128, 1K, 4K; 4 layers, d_model 256
    python benchmarks/generation.py --contexts 128 4096 --new-tokens 64 --models transformer h3
    python benchmarks/generation.py --vocab 1024    # a small head, so the sequence mixers dominate

With the GPT-2 vocabulary the fp32 tied head (50257 x 256, 51 MB) is read from memory for every
token by every model; on a CPU with little memory bandwidth it is most of the per-token time and
hides the mixers' difference (experiments.md, "Generation latency").

Every model is the repository's LM (``configs/model/<name>.yaml``) at 4 layers, d_model 256 and
the GPT-2 vocabulary (50257, so the LM head costs what it costs in a real LM), in eval mode,
float32, batch 1. For each context C a random prompt of C tokens is prefilled once
(``model(prompt, state=state)``) and then ``--new-tokens`` tokens are generated greedily with
``model.step``; the per-token latency is the decode time divided by the number of steps. Models
are timed in interleaved rounds (every context and model once per round) so load changes on a
shared machine hit all of them; each entry is the median over rounds. Printed: ms/token,
tokens/s, prefill ms, and the ratios transformer/model (> 1: faster than the KV-cache
Transformer; as a ratio of medians and as the median of the per-round ratios) and
latency(C)/latency(first C) (flatness).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from serengeti.models.backbone import build_model
from serengeti.models.generation import generate

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
MODELS = ["transformer", "h3", "hyena_s5", "hyena"]


def build(name: str, *, d_model: int, n_layer: int, vocab: int, l_max: int) -> torch.nn.Module:
    """The LM of ``configs/model/<name>.yaml`` at the benchmark's shape, eval mode."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"model={name}", f"model.d_model={d_model}", f"model.n_layer={n_layer}", f"model.vocab_size={vocab}",
            f"model.l_max={l_max}"])
    torch.manual_seed(0)
    return build_model(OmegaConf.to_container(cfg.model, resolve=True)).eval()


def time_one(model, context: int, new_tokens: int, vocab: int, clock=time.perf_counter) -> tuple[float, float]:
    """(ms per decoded token, prefill ms) of one greedy generation after a random prompt."""
    prompt = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(context))
    gen = generate(model, prompt, new_tokens + 1, temperature=0.0, clock=clock)
    return gen.ms_per_token, 1e3 * gen.prefill_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: time.perf_counter; cpu: time.thread_time of the calling thread (with --threads 1, "
                        "the compute time without the waits a busy shared machine adds)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    if args.clock == "cpu" and torch.get_num_threads() > 1:
        p.error("--clock cpu counts the calling thread only: use it with --threads 1")
    names = ["transformer"] + [n for n in args.models if n != "transformer"]
    l_max = max(args.contexts) + args.new_tokens
    models = {n: build(n, d_model=args.d_model, n_layer=args.n_layer, vocab=args.vocab, l_max=l_max) for n in names}
    print(f"# {args.n_layer} layers, d_model {args.d_model}, vocab {args.vocab}, batch 1, float32, "
          f"{args.new_tokens} new tokens, median of {args.repeats} interleaved rounds, {torch.get_num_threads()} threads, "
          f"{args.clock} clock")
    for C in args.contexts:  # warm-up at every context (allocator, kernels)
        for m in models.values():
            time_one(m, C, 2, args.vocab)
    # rounds outermost, so a load change on a shared machine hits every context and model alike
    runs = {(n, C): [] for n in names for C in args.contexts}
    for r in range(args.repeats):
        for C in args.contexts:
            for n, m in models.items():
                runs[n, C].append(time_one(m, C, args.new_tokens, args.vocab, clock))
        print(f"[round {r + 1}/{args.repeats}] " + "  ".join(
            f"{n}@{C}={runs[n, C][-1][0]:.2f}ms/tok" for C in args.contexts for n in names), flush=True)
    lat = {n: {C: statistics.median(r[0] for r in runs[n, C]) for C in args.contexts} for n in names}
    pre = {n: {C: statistics.median(r[1] for r in runs[n, C]) for C in args.contexts} for n in names}

    # Ratios within a round share the machine's state at that moment; their median is steadier than a
    # ratio of medians when the machine's speed drifts between rounds.
    tf_ratio = {(n, C): statistics.median(t[0] / m[0] for t, m in zip(runs["transformer", C], runs[n, C]))
                for n in names for C in args.contexts}
    c0 = args.contexts[0]
    print(f"\n{'model':<12} {'context':>7} {'ms/token':>9} {'tokens/s':>9} {'prefill ms':>11} "
          f"{'tf/model':>9} {'(per round)':>11} {'vs ctx ' + str(c0):>11} {'prefill/tf':>11}")
    for n in names:
        for C in args.contexts:
            print(f"{n:<12} {C:>7} {lat[n][C]:>9.2f} {1e3 / lat[n][C]:>9.0f} {pre[n][C]:>11.1f} "
                  f"{lat['transformer'][C] / lat[n][C]:>9.2f} {tf_ratio[n, C]:>11.2f} {lat[n][C] / lat[n][c0]:>11.2f} "
                  f"{pre[n][C] / pre['transformer'][C]:>11.2f}")


if __name__ == "__main__":
    main()
