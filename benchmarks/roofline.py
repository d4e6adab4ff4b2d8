"""How close each hot path runs to this machine's limits: ceilings, then a roofline per path.

    python benchmarks/roofline.py                               # ceilings, training at 1K/8K/32K, generation at 4K
    python benchmarks/roofline.py --lengths 1024 --repeats 3 --skip-generation
    python benchmarks/roofline.py --plot docs/figures/roofline.png

**Ceilings** (fp32, median of repeats, measured before and after the hot paths; the larger of the two
is used, since load on a shared machine only lowers them):

* matmul: ``torch.mm`` of two (n, n) matrices, 2 n³ FLOPs, at 1 thread and at all threads;
* memory bandwidth: stream-like ``copy`` (b = a, 8 bytes per element: read + write) and ``triad``
  (a = b + s·c, 12 bytes per element) over 64 MiB arrays (twice the 32 MiB L3), 1 and all threads;
* FFT: ``irfft(rfft(x, n), n)`` on (256, n) at the sizes our convolutions use (n = 2L), counted as
  2.5 n log2 n FLOPs per real transform of one row (the usual convention: half a complex FFT's 5 n log2 n).

**Hot paths** — for each, FLOPs and bytes come from the shapes by the formulas below, the time is
measured, and the roofline lower bound is ``t_min = max(t_compute, t_memory)`` with
``t_compute = matmul FLOPs / matmul ceiling + FFT FLOPs / FFT ceiling at that size`` and
``t_memory = bytes / triad bandwidth``; the *achieved fraction* is ``t_min / t_measured`` and the
binding ceiling is whichever term is larger. The *load-adjusted fraction* divides instead by the
ceilings scaled to the machine's speed at the moment of each call (:class:`Probe`, a 512³ matmul and
a triad taken just before it): on a machine shared with other processes it is the steadier number.
Elementwise work (gates, GELU, scans, the H3 power
tables) adds time but no counted FLOPs: it is part of the gap.

Training, one mixer, forward + backward (input and parameter grads), B × L tokens of width D,
``n = fast_fft_size(2L)``, ``F(n) = 2.5 n log2 n``:

* a linear map of ``k`` to ``m`` features over T tokens costs ``6 T k m`` (forward 2, backward 4);
* ``gated_fftconv`` over B·H rows: 4 B·H + 2 H real transforms of size n (forward: input, kernel,
  inverse; backward: output grad, two inverse correlations), i.e. ``(4 B H + 2 H) F(n)``;
* attention: Wqkv + out_proj ``24 B L D²`` plus causal SDPA ``6 B L² D`` (QKᵀ and PV over the lower
  triangle: forward 2 B L² D, backward twice that);
* Hyena (order N, filter MLP emb e → W → W … → D(N−1)): ``6 B L (N+2) D²`` projections +
  ``6 L (e W + i W² + W D (N−1))`` filter MLP (i inner layers) + N−1 gated convolutions with H = D;
* H3 (head_dim 1, d_state N): ``24 B L D²`` + the Vandermonde kernel as a real (D, N) × (N, L)
  product ``6 D N L`` + one gated convolution + the shift filter ``fir_conv``: FFT of size
  ``fast_fft_size(L + N)`` when B·⌈L/c⌉ ≤ 32 chunk rows (c = max(N, 64)), else Toeplitz blocks
  ``6 B D ⌈L/c⌉ 2c²``; the shift kernel's own FFTs (size 2N, D rows) are included;
* LongConv (C channels): ``6 B L (2 C D²)`` output Linear + one ``gated_fftconv`` whose C kernels
  share the input's spectrum: 2 (B·D + C·D + B·C·D) real transforms;
* Hyena-S5 (P complex states): ``6 B L (N+2) D²`` + S5's B̄u and C̃x ``6 B L (2 · 2P D)`` (+ ``6 B L D²``
  for a GLU activation); the scan is elementwise.

Bytes (training), the traffic a fused implementation could not avoid: the input, output and their
gradients (4 B L D), the activations saved for the backward written once and read once (2 S), and
every parameter read twice with its gradient written (3 P), times 4 bytes. S per mixer: attention
q, k, v, output 4 B L D; Hyena the projection (N+1) B L D, each long convolution's input and output
2 (N−1) B L D and its filter (N−1) D L; H3 q, k, v, k̃, y 5 B L D and the kernel D L; LongConv u,
y and GELU(y) B L D (1 + 2C) and the kernels C D L; Hyena-S5 (N+1) B L D + 2 B L D + the states 2 B L P.

Generation, one ``LMHeadModel.step`` at context C (batch 1): every weight (:func:`step_weights`) is
read once and used for one multiply-add (the tied head reads the whole V × D table), so
``FLOPs = 2 · weights + state work`` and ``bytes = 4 · weights + state bytes``; per layer the state
work / bytes are attention 4 C D / 8 C D (keys and values), Hyena 2 C D / 8 C D per long
convolution (history and cached filter), LongConv 2 C·ch·D / 4 C D (1 + ch); H3 and Hyena-S5 keep a
fixed state (H3: 16 D N / 8 D N for the D·N/2 complex modes; S5: B̄u and C̃x 8 P D + 8 P / 16 P D + 16 P).

Every result line carries the 1/5/15-minute load average (``os.getloadavg``): on a shared machine
the ratios, not the absolute times, are what carries over.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/mixers.py

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mixers import BUILDERS, time_fwd_bwd  # noqa: E402  (the mixers of experiments.md section 4.1, same settings)

from serengeti.ops.fftconv import fast_fft_size  # noqa: E402
from serengeti.ops.ssm_kernel import FIR_FFT_MAX_ROWS  # noqa: E402
from serengeti.runtime import available_cpus  # noqa: E402

TRAIN_MIXERS = ["attention", "hyena", "h3", "longconv", "hyena_s5"]
GEN_MODELS = ["transformer", "h3", "hyena_s5", "hyena", "longconv"]
FFT_ROWS = 256  # rows of the FFT ceiling: d_model 256 channels, batch 1


def load() -> str:
    """The 1/5/15-minute load average as printed next to every result."""
    return "load {:.2f}/{:.2f}/{:.2f}".format(*os.getloadavg())


def fft_flops(n: int, rows: float = 1, complex_: bool = False) -> float:
    """FLOPs of ``rows`` transforms of size n: 2.5 n log2 n real, 5 n log2 n complex."""
    return rows * (5.0 if complex_ else 2.5) * n * math.log2(n)


# ------------------------------------------------------------------------------------------------
# ceilings


def _median_rate(fn, work: float, repeats: int, min_time: float = 0.2) -> float:
    """``work`` per second of ``fn()``: median over ``repeats`` timings of enough calls to last ``min_time``."""
    fn()
    t0 = time.perf_counter()
    fn()
    calls = max(1, int(min_time / max(time.perf_counter() - t0, 1e-6)))
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rates.append(work * calls / (time.perf_counter() - t0))
    return statistics.median(rates)


@dataclass
class Ceilings:
    """Measured limits: FLOP/s and bytes/s per thread count, FFT FLOP/s per size (at ``fft_threads``)."""

    matmul: dict[int, float]
    copy: dict[int, float]
    triad: dict[int, float]
    fft: dict[int, float]
    fft_threads: int

    def best(self, other: "Ceilings") -> "Ceilings":
        """Elementwise maximum of two measurements (load on a shared machine only ever lowers a ceiling)."""
        pick = lambda a, b: {k: max(a[k], b[k]) for k in a}  # noqa: E731
        return Ceilings(pick(self.matmul, other.matmul), pick(self.copy, other.copy), pick(self.triad, other.triad),
                        pick(self.fft, other.fft), self.fft_threads)

    def fft_at(self, n: int) -> float:
        """FFT ceiling at size n: the measured size closest in log2."""
        return self.fft[min(self.fft, key=lambda m: abs(math.log2(m) - math.log2(n)))]


class Probe:
    """A quick speed check taken next to every timed hot-path call: one 512³ matmul and one triad
    over 16 MiB arrays (above L2), at the current thread count.

    ``factors()`` = (matmul rate, triad rate) now / at ``reference()`` (taken with the ceilings),
    so that a call timed while other processes slowed the machine is compared with the ceilings
    scaled by the same slowdown (the *load-adjusted* fraction)."""

    def __init__(self) -> None:
        self.a, self.b, self.out = torch.randn(512, 512), torch.randn(512, 512), torch.empty(512, 512)
        n = 4 * 2**20
        self.x, self.y, self.z = torch.rand(n), torch.rand(n), torch.empty(n)
        self.ref = (1.0, 1.0)

    def _rates(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        torch.mm(self.a, self.b, out=self.out)
        t1 = time.perf_counter()
        torch.add(self.x, self.y, alpha=3.0, out=self.z)
        t2 = time.perf_counter()
        return 2.0 * 512**3 / (t1 - t0), 12.0 * self.x.numel() / (t2 - t1)

    def reference(self, repeats: int) -> None:
        self._rates()
        rates = [self._rates() for _ in range(max(5, repeats))]
        self.ref = (statistics.median(r[0] for r in rates), statistics.median(r[1] for r in rates))

    def factors(self) -> tuple[float, float]:
        mm, bw = self._rates()
        return mm / self.ref[0], bw / self.ref[1]


def measure_ceilings(fft_sizes: list[int], threads: int, repeats: int, *, matmul_n: int = 1024,
                     stream_mib: int = 64, min_time: float = 0.2) -> Ceilings:
    """Matmul and stream bandwidth at 1 and ``available_cpus()`` threads, FFT at ``threads``."""
    counts = sorted({1, available_cpus()})
    a = torch.randn(matmul_n, matmul_n)
    b = torch.randn(matmul_n, matmul_n)
    out = torch.empty(matmul_n, matmul_n)
    N = stream_mib * 2**20 // 4
    x, y, z = torch.rand(N), torch.rand(N), torch.empty(N)
    matmul, copy, triad = {}, {}, {}
    for t in counts:
        torch.set_num_threads(t)
        matmul[t] = _median_rate(lambda: torch.mm(a, b, out=out), 2.0 * matmul_n**3, repeats, min_time)
        copy[t] = _median_rate(lambda: z.copy_(x), 8.0 * N, repeats, min_time)
        triad[t] = _median_rate(lambda: torch.add(x, y, alpha=3.0, out=z), 12.0 * N, repeats, min_time)
        print(f"[ceiling] threads {t}: matmul {matmul[t] / 1e9:.1f} GFLOP/s, copy {copy[t] / 1e9:.1f} GB/s, "
              f"triad {triad[t] / 1e9:.1f} GB/s  ({load()})", flush=True)
    torch.set_num_threads(threads)
    fft = {}
    for n in fft_sizes:
        u = torch.randn(FFT_ROWS, n)
        fft[n] = _median_rate(lambda: torch.fft.irfft(torch.fft.rfft(u, n=n), n=n), 2 * fft_flops(n, FFT_ROWS), repeats, min_time)
        print(f"[ceiling] threads {threads}: rfft+irfft (256, {n}): {fft[n] / 1e9:.1f} GFLOP/s  ({load()})", flush=True)
    return Ceilings(matmul, copy, triad, fft, threads)


# ------------------------------------------------------------------------------------------------
# work of the hot paths, by formula


@dataclass
class Work:
    """Counted work of one hot path: matmul FLOPs, FFT FLOPs at size ``n``, compulsory bytes, and
    the FLOPs of a generation step's state update (``other``, charged at the matmul ceiling)."""

    matmul: float
    fft: float
    n: int
    bytes: float
    other: float = 0.0

    def bound(self, c: Ceilings, threads: int) -> tuple[float, str]:
        """(roofline lower bound in seconds, binding ceiling: "compute" or "memory")."""
        t_compute, t_memory = self.times(c, threads)
        return (t_compute, "compute") if t_compute >= t_memory else (t_memory, "memory")

    def times(self, c: Ceilings, threads: int) -> tuple[float, float]:
        """(seconds at the compute ceilings, seconds at the triad bandwidth)."""
        t_compute = (self.matmul + self.other) / c.matmul[threads] + (self.fft / c.fft_at(self.n) if self.fft else 0.0)
        return t_compute, self.bytes / c.triad[threads]


def _gated_fftconv_ffts(B: int, H: int, L: int) -> float:
    return fft_flops(fast_fft_size(2 * L), 4 * B * H + 2 * H)


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def train_work(name: str, mixer: torch.nn.Module, B: int, L: int) -> Work:
    """FLOPs and bytes of one forward + backward of ``mixer`` on (B, L, D) (formulas: module docstring)."""
    D = mixer.d_model
    n = fast_fft_size(2 * L)
    T = B * L
    mm = fft = 0.0
    if name == "attention":
        mm = 24 * T * D * D + 6 * B * L * L * D
        saved = 4 * T * D
    elif name in ("hyena", "hyena3"):
        N = mixer.order
        f = mixer.filter_fn
        layers = [m for m in f.implicit_filter if isinstance(m, torch.nn.Linear)]
        mm = 6 * T * (N + 2) * D * D + 6 * L * sum(m.in_features * m.out_features for m in layers)
        fft = (N - 1) * _gated_fftconv_ffts(B, D, L)
        saved = (N + 1) * T * D + 2 * (N - 1) * T * D + (N - 1) * D * L
    elif name == "h3":
        Ns = mixer.d_state
        mm = 24 * T * D * D + 6 * D * Ns * L
        fft = _gated_fftconv_ffts(B, D, L)
        fft += fft_flops(2 * Ns, 4 * D) + fft_flops(2 * Ns, 2 * D, complex_=True)  # shift kernel fwd + bwd
        c = max(Ns, 64)
        chunks = -(-L // c)
        if B * chunks <= FIR_FFT_MAX_ROWS:
            m = fast_fft_size(L + Ns)
            fft += fft_flops(m, 3 * B * D + D) + fft_flops(m, D + B * D, complex_=True)
        else:
            mm += 6 * B * D * chunks * 2 * c * c
        saved = 5 * T * D + D * L
    elif name == "longconv":
        C = mixer.channels
        mm = 6 * T * 2 * C * D * D
        fft = fft_flops(n, 2 * (B * D + C * D + B * C * D))
        saved = T * D * (1 + 2 * C) + C * D * L
    elif name == "hyena_s5":
        N = mixer.order
        s5 = mixer.ssm[0]
        P = s5.P
        mm = 6 * T * (N + 2) * D * D + 6 * T * (2 * 2 * P * D) * (N - 1)
        mm += 6 * T * D * D * (N - 1) * sum(hasattr(s5, o) for o in ("out1", "out2"))
        saved = (N + 1) * T * D + 2 * T * D + 2 * T * P
    else:
        raise ValueError(f"no work formula for mixer {name!r}")
    return Work(float(mm), float(fft), n, 4.0 * (4 * T * D + 2 * saved + 3 * _params(mixer)))


def step_weights(model: torch.nn.Module) -> int:
    """Weights one ``model.step`` reads: every Linear (the tied head: the whole V × D table), LayerNorm
    and short convolution, except the Hyena filter MLP (its filters are cached in the state); the
    SSM / kernel parameters are cached in the state too and counted there."""
    from serengeti.ops.short_conv import ShortConv

    seen, total = set(), 0
    for name, module in model.named_modules():
        if "filter_fn" in name or not isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm, ShortConv)):
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def step_work(model: torch.nn.Module, C: int) -> Work:
    """FLOPs and bytes of one ``model.step`` at context C, batch 1 (formulas: module docstring)."""
    weights = step_weights(model)
    flops, state_bytes = 0.0, 0.0
    for layer in model.layers:
        mixer = layer.mixer
        D = mixer.d_model
        kind = type(mixer).__name__
        if kind == "Attention":
            flops += 4 * C * D
            state_bytes += 8 * C * D
        elif kind == "Hyena":
            flops += (mixer.order - 1) * 2 * C * D
            state_bytes += (mixer.order - 1) * 8 * C * D
        elif kind == "LongConv":
            flops += 2 * C * mixer.channels * D
            state_bytes += 4 * C * D * (1 + mixer.channels)
        elif kind == "H3":
            flops += 16 * D * mixer.d_state
            state_bytes += 8 * D * mixer.d_state
        elif kind == "HyenaS5":
            P = mixer.ssm[0].P
            flops += (mixer.order - 1) * (8 * P * D + 8 * P)
            state_bytes += (mixer.order - 1) * (16 * P * D + 16 * P)
        else:
            raise ValueError(f"no step formula for mixer {kind}")
    return Work(2.0 * weights, 0.0, 1, 4.0 * weights + state_bytes, other=flops)


# ------------------------------------------------------------------------------------------------
# measurements


@dataclass
class Timed:
    """A hot path's timings: seconds per call and the :class:`Probe` factors taken before each."""

    work: Work
    times: list[float]
    factors: list[tuple[float, float]]

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None


def measure_training(names: list[str], lengths: list[int], *, d_model: int, repeats: int, max_seconds: float,
                     probe: Probe, args) -> dict:
    """{(name, L): :class:`Timed` (no times when skipped)}; rounds interleave the mixers.

    A cell is skipped (None) when its warm-up call alone would push ``repeats`` calls past
    ``max_seconds`` (e.g. attention at 32K on 2 cores)."""
    out = {}
    for L in lengths:
        torch.manual_seed(0)
        x = torch.randn(1, L, d_model, requires_grad=True)
        g = torch.randn(1, L, d_model)
        mixers = {}
        for name in names:
            m = BUILDERS[name](d_model, L, args).train()
            work = train_work(name, m, 1, L)
            if name == "attention" and L > args.attention_max_len:
                out[name, L] = Timed(work, [], [])
                print(f"[train] {name} L={L}: skipped (--attention-max-len {args.attention_max_len})", flush=True)
                continue
            t = time_fwd_bwd(m, x, g)  # warm-up, also the estimate for the skip rule
            if t * repeats > max_seconds:
                out[name, L] = Timed(work, [], [])
                print(f"[train] {name} L={L}: skipped, one call took {t:.1f} s ({load()})", flush=True)
                continue
            mixers[name] = m
            out[name, L] = Timed(work, [], [])
        for _ in range(repeats):
            for n, m in mixers.items():
                out[n, L].factors.append(probe.factors())
                out[n, L].times.append(time_fwd_bwd(m, x, g))
        for n in mixers:
            print(f"[train] {n} L={L}: {1e3 * out[n, L].median:.1f} ms (median of {repeats}) ({load()})", flush=True)
    return out


def measure_generation(names: list[str], vocabs: list[int], *, context: int, steps: int, repeats: int,
                       d_model: int, n_layer: int, probe: Probe) -> dict:
    """{(name, V): :class:`Timed` (seconds per step)} after a ``context``-token prefill; interleaved."""
    from generation import build

    cases = {}
    for V in vocabs:
        for name in names:
            model = build(name, d_model=d_model, n_layer=n_layer, vocab=V, l_max=context + steps * (repeats + 1) + 1)
            cases[name, V] = model
    states = {}
    with torch.inference_mode():
        for key, model in cases.items():
            state = model.allocate_state(1, max_len=context + steps * (repeats + 1) + 1)
            prompt = torch.randint(0, key[1], (1, context), generator=torch.Generator().manual_seed(0))
            model(prompt, state=state, num_last_tokens=1)
            tok = torch.zeros(1, dtype=torch.long)
            for _ in range(steps):  # warm-up
                model.step(tok, state)
            states[key] = state
        out = {key: Timed(step_work(model, context), [], []) for key, model in cases.items()}
        for _ in range(repeats):
            for key, model in cases.items():
                tok = torch.zeros(1, dtype=torch.long)
                out[key].factors.append(probe.factors())
                t0 = time.perf_counter()
                for _ in range(steps):
                    model.step(tok, states[key])
                out[key].times.append((time.perf_counter() - t0) / steps)
    for key in cases:
        print(f"[step] {key[0]} V={key[1]} C={context}: {1e3 * out[key].median:.2f} ms (median of {repeats} x {steps} "
              f"steps) ({load()})", flush=True)
    return out


# ------------------------------------------------------------------------------------------------
# report


def table(rows: dict, c: Ceilings, c_ref: Ceilings, threads: int, label) -> list[dict]:
    """One dict per hot path with its work, time, bound and fractions (None where skipped):
    ``fraction`` against the ceilings ``c``, ``adjusted`` the median over calls of the bound at the
    ceilings ``c_ref`` (measured with the probe's reference) scaled by that call's :class:`Probe`
    factors, divided by the call's time."""
    result = []
    for key, timed in rows.items():
        w, t = timed.work, timed.median
        bound, binding = w.bound(c, threads)
        t_c, t_m = w.times(c_ref, threads)
        adjusted = [max(t_c / f_c, t_m / f_m) / s for s, (f_c, f_m) in zip(timed.times, timed.factors)]
        flop = w.matmul + w.fft + w.other
        result.append(dict(path=label(key), gflop=flop / 1e9, mm_share=w.matmul / flop,
                           mb=w.bytes / 1e6, intensity=flop / w.bytes, t=t, bound=bound, binding=binding,
                           fraction=None if t is None else bound / t,
                           adjusted=statistics.median(adjusted) if adjusted else None))
    return result


def markdown(rows: list[dict]) -> str:
    lines = ["| hot path | GFLOP | matmul share | MB | FLOP/byte | measured ms | bound ms | binding | fraction | load-adjusted |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        t = "skipped" if r["t"] is None else f"{1e3 * r['t']:.1f}"
        f = "–" if r["fraction"] is None else f"{100 * r['fraction']:.1f} %"
        a = "–" if r["adjusted"] is None else f"{100 * r['adjusted']:.1f} %"
        lines.append(f"| {r['path']} | {r['gflop']:.3g} | {100 * r['mm_share']:.0f} % | {r['mb']:.3g} | "
                     f"{r['intensity']:.3g} | {t} | {1e3 * r['bound']:.2f} | {r['binding']} | {f} | {a} |")
    return "\n".join(lines)


def plot(rows: list[dict], c: Ceilings, threads: int, path: Path) -> None:
    """Log-log roofline: achieved GFLOP/s vs FLOP/byte, roofs at the matmul and FFT ceilings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    bw = c.triad[threads]
    xs = [10 ** (e / 10) for e in range(-10, 41)]
    ax.plot(xs, [min(c.matmul[threads], x * bw) / 1e9 for x in xs], "k-", label=f"matmul {c.matmul[threads] / 1e9:.0f} GFLOP/s, triad {bw / 1e9:.1f} GB/s")
    for n, f in sorted(c.fft.items()):
        ax.plot(xs, [min(f, x * bw) / 1e9 for x in xs], ":", lw=1, label=f"FFT n={n}: {f / 1e9:.1f} GFLOP/s")
    for r in rows:
        if r["t"] is None:
            continue
        y = r["gflop"] / r["t"]
        ax.plot(r["intensity"], y, "o" if r["path"].startswith("train") else "s", ms=5)
        ax.annotate(r["path"].split(": ")[-1], (r["intensity"], y), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved GFLOP/s (counted FLOPs / measured time)")
    ax.set_title(f"fp32 roofline, {threads} thread(s); circles: training fwd+bwd, squares: generation step", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--mixers", nargs="+", default=TRAIN_MIXERS, choices=sorted(BUILDERS))
    p.add_argument("--gen-models", nargs="+", default=GEN_MODELS, choices=GEN_MODELS)
    p.add_argument("--vocabs", type=int, nargs="+", default=[1024, 50257])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--steps", type=int, default=16, help="generation steps per timing")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4, help="generation LMs (as benchmarks/generation.py)")
    p.add_argument("--num-heads", type=int, default=4, help="attention heads in the training table")
    p.add_argument("--threads", type=int, default=1, help="threads of the hot paths (ceilings: 1 and all)")
    p.add_argument("--attention-max-len", type=int, default=8192, help="attention training cells above this are skipped")
    p.add_argument("--max-seconds", type=float, default=120.0, help="skip a training cell whose repeats would take longer")
    p.add_argument("--stream-mib", type=int, default=64)
    p.add_argument("--matmul-n", type=int, default=1024, help="size of the square matmul ceiling")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds per ceiling timing (calls repeated to fill it)")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--skip-generation", action="store_true")
    p.add_argument("--plot", type=Path, default=None, help="write the roofline plot here (png)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, {available_cpus()} CPUs, hot paths at {args.threads} thread(s), fp32, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} ({load()})", flush=True)
    fft_sizes = sorted({fast_fft_size(2 * L) for L in args.lengths})
    first = measure_ceilings(fft_sizes, args.threads, args.repeats, stream_mib=args.stream_mib, matmul_n=args.matmul_n,
                             min_time=args.min_time)
    torch.set_num_threads(args.threads)
    probe = Probe()
    probe.reference(args.repeats)
    train = gen = {}
    if not args.skip_training:
        train = measure_training(args.mixers, args.lengths, d_model=args.d_model, repeats=args.repeats,
                                 max_seconds=args.max_seconds, probe=probe, args=args)
    if not args.skip_generation:
        gen = measure_generation(args.gen_models, args.vocabs, context=args.context, steps=args.steps,
                                 repeats=args.repeats, d_model=args.d_model, n_layer=args.n_layer, probe=probe)
    print("ceilings again, after the hot paths:", flush=True)
    c = first.best(measure_ceilings(fft_sizes, args.threads, args.repeats, stream_mib=args.stream_mib, matmul_n=args.matmul_n,
                             min_time=args.min_time))
    torch.set_num_threads(args.threads)
    rows = (table(train, c, first, args.threads, lambda k: f"train {k[0]} L={k[1]}")
            + table(gen, c, first, args.threads, lambda k: f"step {k[0]} V={k[1]} C={args.context}"))
    print(f"\nceilings at {args.threads} thread(s) (the better of the two measurements): matmul {c.matmul[args.threads] / 1e9:.1f} GFLOP/s, "
          f"triad {c.triad[args.threads] / 1e9:.1f} GB/s, FFT " +
          ", ".join(f"n={n}: {f / 1e9:.1f} GFLOP/s" for n, f in sorted(c.fft.items())) + f" ({load()})\n")
    print(markdown(rows))
    if args.plot:
        plot(rows, c, args.threads, args.plot)
        print(f"\nplot: {args.plot}")
    print(f"\nwall time {time.perf_counter() - t0:.0f} s ({load()})")
    return rows


if __name__ == "__main__":
    main()
