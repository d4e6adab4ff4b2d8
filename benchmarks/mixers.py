"""Forward+backward time of each sequence mixer vs SDPA causal attention, as ratios from one run.

    python benchmarks/mixers.py                       # L = 1K .. 32K, d_model 256, B 1, fp32
    python benchmarks/mixers.py --lengths 1024 4096 --repeats 3 --mixers hyena h3

For every length the mixers are built once (same seed), warmed up once, then timed in
interleaved rounds (attention, hyena, h3, ... , attention, hyena, ...) so that load changes on
a shared machine hit every mixer alike; each entry is the median over rounds. The table shows
``attention time / mixer time`` (> 1: the mixer is faster); the crossover is the first length
from which a mixer stays faster than attention. One timed call is ``y = mixer(x)`` and
``y.backward(g)`` with ``x`` requiring grad (gradients of the input and every parameter).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

# Idle OpenMP threads sleep instead of spinning. On a shared, oversubscribed machine spinning makes
# every parallel region wait for a descheduled thread: with 2 threads at load ~11 on 2 cores,
# attention at 1K took 0.70 s spinning vs 0.27 s passive, and the many-small-op mixers lost 2-3x
# more. Must be set before the OpenMP runtime starts (before importing torch).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from serengeti.mixers import H3, Attention, Hyena, HyenaS5, LongConv  # noqa: E402

BUILDERS = {
    "attention": lambda d, L, a: Attention(d, l_max=L, num_heads=a.num_heads),
    "hyena": lambda d, L, a: Hyena(d, l_max=L, order=2),
    "hyena3": lambda d, L, a: Hyena(d, l_max=L, order=3),
    "h3": lambda d, L, a: H3(d, l_max=L, d_state=64, head_dim=1),
    "longconv": lambda d, L, a: LongConv(d, l_max=L, channels=2, kernel_dropout=0.0, dropout=0.0),
    "hyena_s5": lambda d, L, a: HyenaS5(d, l_max=L, order=2),
}


def time_fwd_bwd(mixer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> float:
    """Seconds for one forward + backward of ``mixer`` on ``x: (B, L, D)`` with output grad ``g``."""
    mixer.zero_grad(set_to_none=True)
    x.grad = None
    t0 = time.perf_counter()
    mixer(x).backward(g)
    return time.perf_counter() - t0


def run(lengths: list[int], names: list[str], *, d_model: int, batch: int, repeats: int, warmup_max_len: int,
        args) -> dict:
    """{L: {name: median seconds}} for every length and mixer (attention always included)."""
    names = ["attention"] + [n for n in names if n != "attention"]
    results = {}
    for L in lengths:
        torch.manual_seed(0)
        mixers = {n: BUILDERS[n](d_model, L, args).train() for n in names}
        x = torch.randn(batch, L, d_model, requires_grad=True)
        g = torch.randn(batch, L, d_model)
        if L <= warmup_max_len:  # warm-up (allocator, FFT plans); above this a call takes seconds
            for m in mixers.values():
                time_fwd_bwd(m, x, g)
        times = {n: [] for n in names}
        for _ in range(repeats):
            for n, m in mixers.items():
                times[n].append(time_fwd_bwd(m, x, g))
        results[L] = {n: statistics.median(t) for n, t in times.items()}
        row = "  ".join(f"{n}={1e3 * s:.1f}ms" for n, s in results[L].items())
        print(f"[L={L}] median of {repeats}: {row}", flush=True)
    return results


def report(results: dict, names: list[str]) -> str:
    """Markdown table of attention/mixer ratios and each mixer's crossover length."""
    others = [n for n in names if n != "attention"]
    lines = ["| L | attention (ms) | " + " | ".join(f"{n} (×)" for n in others) + " |",
             "|---|---|" + "---|" * len(others)]
    for L, row in results.items():
        ratios = " | ".join(f"{row['attention'] / row[n]:.2f}" for n in others)
        lines.append(f"| {L} | {1e3 * row['attention']:.1f} | {ratios} |")
    lines.append("")
    for n in others:
        faster = [row["attention"] > row[n] for row in results.values()]
        Ls = list(results)
        cross = next((Ls[i] for i in range(len(Ls)) if all(faster[i:])), None)
        lines.append(f"crossover {n}: " + (f"faster than attention from L = {cross}" if cross else "never faster in this range"))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--mixers", nargs="+", default=["hyena", "h3", "longconv"], choices=sorted(BUILDERS))
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per length (median reported)")
    p.add_argument("--warmup-max-len", type=int, default=8192,
                   help="one untimed call per mixer at lengths up to this (attention at 32K costs minutes on 2 cores)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--num-heads", type=int, default=4, help="attention heads (head_dim = d_model / heads)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()} (OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), fp32, d_model {args.d_model}, "
          f"B {args.batch}, attention heads {args.num_heads}, repeats {args.repeats} (interleaved, median), "
          f"warm-up up to L={args.warmup_max_len}")
    t0 = time.perf_counter()
    results = run(args.lengths, args.mixers, d_model=args.d_model, batch=args.batch, repeats=args.repeats,
                  warmup_max_len=args.warmup_max_len, args=args)
    print("\nattention time / mixer time (forward+backward; > 1 means faster than attention)\n")
    print(report(results, ["attention"] + args.mixers))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
