"""Forward+backward time of the S5 layer with our parallel scan vs three other ways to get its states.

    python benchmarks/scan.py                          # both parts below, ratios from one run
    python benchmarks/scan.py --lengths 1024 4096 --repeats 3 --skip-shapes

Every method computes the same full S5 layer (REFERENCE.md section 7): discretize, ``B̄u`` (one
matmul), the states ``x_k = Λ̄ ⊙ x_{k-1} + B̄u_k``, ``f·Re(C̃x) + D ⊙ u``; they differ only in how
the states are obtained:

* ``ours``: :class:`serengeti.mixers.S5` as trained (``scan_method=auto``: the chunked scan with
  its adjoint-recurrence backward).
* ``log``: the same layer with our log-depth odd/even scan (``scan_method=log``).
* ``loop``: a well-written sequential loop: time steps taken with ``unbind`` (not ``x[:, t]``,
  whose backward is quadratic), states collected with one ``stack``; autograd backward.
* ``fft``: materialized kernel + FFT convolution: each state is the causal convolution of
  ``B̄u`` with its kernel ``Λ̄^l = exp(l·ΛΔ)`` (L, P_) (a complex FFT of size 2L), as an
  S4/H3-style layer would do it.
* ``assoc``: ``torch._higher_order_ops.associative_scan`` (``combine_mode="generic"``) with the
  S5 operator ``(a_i, b_i) ∘ (a_j, b_j) = (a_j a_i, a_j b_i + b_j)``, as the JAX reference does.

Part 1 sweeps L = 1K ... 64K at P_ = 64 complex states (B 1, H 64, no conj_sym); part 2 times the
two reference shapes: (B 8, L 4096, H 64, ssm_size 128, no conj_sym) and
(B 2, L 16384, H 64, ssm_size 32, conj_sym). Methods are timed in interleaved rounds (ours,
loop, fft, ..., ours, loop, ...) so load changes on a shared machine hit all alike; each entry
is the median over rounds, and the table prints ``method time / ours time`` (> 1: ours is
faster). Before timing, every method's output is checked against ``ours`` (max abs difference
printed). One timed call is ``y = layer(u)`` then ``y.backward(g)`` with ``u`` requiring grad
(gradients of the input and every parameter).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch._higher_order_ops.associative_scan import associative_scan

from serengeti.mixers import S5


def _project_in(m: S5, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Λ̄ (P_,), B̄u (B, L, P_) complex) exactly as :meth:`S5.forward` forms them."""
    Lam_bar, B_bar = m.discretize()
    W_in = torch.view_as_real(B_bar).transpose(0, 1).reshape(u.shape[-1], 2 * m.P)
    return Lam_bar, torch.view_as_complex((u @ W_in).unflatten(-1, (m.P, 2)))


def _project_out(m: S5, u: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """``act(f·Re(C̃x) + D ⊙ u)`` from the states xs (B, L, P_), as :meth:`S5.forward`."""
    y = torch.view_as_real(xs).flatten(-2) @ m._readout()
    return m._activate(y + m.D * u)


def states_loop(Lam_bar: torch.Tensor, Bu: torch.Tensor) -> torch.Tensor:
    """Sequential recurrence over ``Bu.unbind(1)``; (B, L, P_) -> (B, L, P_)."""
    x = torch.zeros_like(Bu[:, 0])
    out = []
    for b_t in Bu.unbind(1):
        x = Lam_bar * x + b_t
        out.append(x)
    return torch.stack(out, 1)


def states_fft(m: S5, Bu: torch.Tensor) -> torch.Tensor:
    """x_k = Σ_{j≤k} Λ̄^{k-j} B̄u_j as FFT convolutions with the materialized kernel (L, P_) (ZOH)."""
    L = Bu.shape[1]
    re = m.Lambda_re.clamp(max=-1e-4) if m.clip_eigs else m.Lambda_re
    z = torch.complex(re, m.Lambda_im) * (m.step_rescale * torch.exp(m.log_step[:, 0]))  # ΛΔ (P_,)
    kernel = torch.exp(torch.arange(L, dtype=torch.float32)[:, None] * z)  # Λ̄^l, (L, P_)
    n = 2 * L
    spec = torch.fft.fft(kernel, n=n, dim=0) * torch.fft.fft(Bu, n=n, dim=1)
    return torch.fft.ifft(spec, n=n, dim=1)[:, :L]


def states_assoc(Lam_bar: torch.Tensor, Bu: torch.Tensor) -> torch.Tensor:
    """torch's generic associative_scan over time with per-step (a, b) = (Λ̄, B̄u_k)."""

    def combine(left, right):
        return right[0] * left[0], right[0] * left[1] + right[1]

    a = Lam_bar.expand_as(Bu)
    return associative_scan(combine, (a, Bu), dim=1, combine_mode="generic")[1]


def make_methods(m_auto: S5, m_log: S5, names: list[str]) -> dict:
    """{name: u -> y} for the requested methods (all share the parameters of ``m_auto``)."""
    def via(states):
        def layer(u):
            Lam_bar, Bu = _project_in(m_auto, u)
            return _project_out(m_auto, u, states(Lam_bar, Bu))
        return layer

    table = {
        "ours": m_auto,
        "log": m_log,
        "loop": via(states_loop),
        "fft": via(lambda Lam_bar, Bu: states_fft(m_auto, Bu)),
        "assoc": via(states_assoc),
    }
    return {n: table[n] for n in names}


def build(H: int, ssm_size: int, conj_sym: bool) -> tuple[S5, S5]:
    """The layer with the chunked scan and an identical copy using the log-depth scan."""
    kw = dict(ssm_size=ssm_size, blocks=max(1, ssm_size // 4), conj_sym=conj_sym, C_init="complex_normal",
              dt_min=1e-3, dt_max=0.1, activation="gelu")
    torch.manual_seed(0)
    m_auto = S5(H, scan_method="auto", **kw)
    torch.manual_seed(0)
    m_log = S5(H, scan_method="log", **kw)
    return m_auto, m_log


CLOCK = time.perf_counter


def time_fwd_bwd(layer, params: list[torch.Tensor], u: torch.Tensor, g: torch.Tensor) -> float:
    """Seconds (of ``CLOCK``) for ``layer(u).backward(g)`` (input and parameter gradients)."""
    for p in params:
        p.grad = None
    u.grad = None
    t0 = CLOCK()
    layer(u).backward(g)
    return CLOCK() - t0


def bench(B: int, L: int, H: int, ssm_size: int, conj_sym: bool, names: list[str], repeats: int) -> dict:
    """{method: median seconds} for one shape; prints the agreement check and the medians."""
    m_auto, m_log = build(H, ssm_size, conj_sym)
    methods = make_methods(m_auto, m_log, names)
    params = list(m_auto.parameters()) + list(m_log.parameters())
    u = torch.randn(B, L, H, requires_grad=True)
    g = torch.randn(B, L, H)
    with torch.no_grad():
        ref = m_auto(u)
        scale = ref.abs().max().item()
        diffs = {n: (f(u) - ref).abs().max().item() / scale for n, f in methods.items() if n != "ours"}
    for f in methods.values():  # warm-up
        time_fwd_bwd(f, params, u, g)
    times = {n: [] for n in methods}
    for _ in range(repeats):
        for n, f in methods.items():
            times[n].append(time_fwd_bwd(f, params, u, g))
    med = {n: statistics.median(t) for n, t in times.items()}
    row = "  ".join(f"{n}={1e3 * s:.1f}ms" for n, s in med.items())
    check = "  ".join(f"{n}:{d:.1e}" for n, d in diffs.items())
    print(f"[B={B} L={L} H={H} P_={m_auto.P} conj_sym={conj_sym}] median of {repeats}: {row}  (max rel diff vs ours: {check})",
          flush=True)
    return med


def table(rows: list[tuple[str, dict]], names: list[str]) -> str:
    """Markdown: ours in ms, then every other method's time / ours."""
    others = [n for n in names if n != "ours"]
    lines = ["| shape | ours (ms) | " + " | ".join(f"{n} / ours" for n in others) + " |",
             "|---|---|" + "---|" * len(others)]
    for label, med in rows:
        ratios = " | ".join(f"{med[n] / med['ours']:.2f}" for n in others)
        lines.append(f"| {label} | {1e3 * med['ours']:.1f} | {ratios} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024 * 2**i for i in range(7)])
    p.add_argument("--P", type=int, default=64, help="complex states in the length sweep (no conj_sym)")
    p.add_argument("--H", type=int, default=64)
    p.add_argument("--batch", type=int, default=1, help="batch of the length sweep")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--methods", nargs="+", default=["ours", "log", "loop", "fft", "assoc"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: process CPU time, robust on a shared machine when used with --threads 1")
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--skip-shapes", action="store_true")
    args = p.parse_args()
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        CLOCK = time.process_time
    names = ["ours"] + [n for n in args.methods if n != "ours"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, fp32/complex64, forward+backward")
    sweep, shapes = [], []
    if not args.skip_sweep:
        for L in args.lengths:
            med = bench(args.batch, L, args.H, args.P, False, names, args.repeats)
            sweep.append((f"B {args.batch}, L {L}, H {args.H}, P_ {args.P}", med))
    if not args.skip_shapes:
        for B, L, ssm, cs in ((8, 4096, 128, False), (2, 16384, 32, True)):
            med = bench(B, L, args.H, ssm, cs, names, args.repeats)
            shapes.append((f"B {B}, L {L}, H {args.H}, ssm {ssm}{', conj_sym' if cs else ''}", med))
    print()
    print(table(sweep + shapes, names))


if __name__ == "__main__":
    main()
